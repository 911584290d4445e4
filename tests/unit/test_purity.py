"""scheduler/ and dataflow/ are pure: importing them pulls in no asyncio, zmq, torch or
device code (a scheduler plugin must be testable without any of it)."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ("asyncio", "zmq", "torch", "triton", "uvloop", "numpy", "moeflow.actors",
             "moeflow.serve", "moeflow.ops")


def test_scheduler_and_dataflow_import_nothing_impure():
    code = (
        "import sys\n"
        "import moeflow.scheduler, moeflow.dataflow, moeflow.dataflow.render\n"
        "import moeflow.scheduler.semantics, moeflow.scheduler.registry\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r} or "
        f"any(m == f or m.startswith(f + '.') for f in {FORBIDDEN!r})]\n"
        "print(','.join(sorted(bad)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"impure imports: {out.stdout.strip()}"
