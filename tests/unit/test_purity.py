"""Import directions. scheduler/ and dataflow/ are pure: importing them pulls in no asyncio,
zmq, torch or device code (a scheduler plugin must be testable without any of it); sim/ is
pure too, but for the calibration of this machine; and nothing below serve/ imports it."""

from __future__ import annotations

import subprocess
import sys

import pytest

IMPURE = ("asyncio", "zmq", "torch", "triton", "uvloop", "numpy", "moeflow.actors",
          "moeflow.serve", "moeflow.ops")
SIM = ("moeflow.sim.cost", "moeflow.sim.hardware", "moeflow.sim.models", "moeflow.sim.workload",
       "moeflow.sim.simulator", "moeflow.sim.trace", "moeflow.sim.hrm", "moeflow.sim.hrm_search")
BELOW_SERVE = ("moeflow.models", "moeflow.dataflow", "moeflow.scheduler", *SIM, "moeflow.ops",
               "moeflow.actors.core", "moeflow.actors.inproc", "moeflow.actors.coordinator",
               "moeflow.actors.process", "moeflow.actors.null", "moeflow.actors.worker",
               "moeflow.actors.plane", "moeflow.actors.messages", "moeflow.actors.values",
               "moeflow.actors.cluster", "moeflow.actors.tracing")


def imported_by(modules: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    """The forbidden modules that importing `modules` (in a fresh interpreter) pulls in."""
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"bad = [m for m in sys.modules if any(m == f or m.startswith(f + '.') "
        f"for f in {forbidden!r})]\n"
        "print(','.join(sorted(bad)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [m for m in out.stdout.strip().split(",") if m]


def test_scheduler_and_dataflow_import_nothing_impure():
    modules = ("moeflow.scheduler", "moeflow.dataflow", "moeflow.dataflow.render",
               "moeflow.scheduler.semantics", "moeflow.scheduler.registry",
               "moeflow.scheduler.plan_cache", "moeflow.scheduler.requests")
    assert imported_by(modules, IMPURE) == []


def test_the_simulator_imports_nothing_impure():
    assert imported_by(SIM, IMPURE) == []


@pytest.mark.parametrize("module", BELOW_SERVE)
def test_nothing_below_serve_imports_it(module):
    assert imported_by((module,), ("moeflow.serve", "moeflow.cli")) == []
