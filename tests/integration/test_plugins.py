"""Scheduler plugins: a separately installed package is found through the
`moeflow.schedulers` entry point and by "module:Class", and generates the same tokens as
batch-ep; unknown names fail with the list of what exists."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moeflow.scheduler.registry import UnknownScheduler, available, scheduler_class

PLUGIN = '''
"""A third-party policy: homes every request on the last device and orders each stream by
a priority (latest layer first) instead of a static sequence."""

from moeflow.dataflow import compile, SeqChunk, Unit
from moeflow.scheduler import BatchEP, ByPriority, Plan
from moeflow.scheduler.plan import node_stream


class MyScheduler(BatchEP):
    name = "my-sched"

    def form_units(self, waiting, running, budget):
        last = sorted(budget.free_kv_blocks)[-1]
        only = type(budget)(budget.max_tokens, budget.max_seqs,
                            {last: budget.free_kv_blocks[last]}, budget.kv_block_size,
                            budget.units_in_flight)
        return super().form_units(waiting, running, only)

    def plan(self, unit, model, cluster):
        graph = compile(model, unit, cluster.placement)
        streams = tuple(node_stream(graph, i) for i in range(len(graph.nodes)))
        keys = tuple((-float(getattr(n, "layer", -1)), float(n.id)) for n in graph.nodes)
        return Plan(graph, streams, tuple((s, ByPriority()) for s in sorted(set(streams))),
                    keys)
'''


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory) -> Path:
    """Build and install the plugin package into its own site directory."""
    root = tmp_path_factory.mktemp("plugin")
    pkg = root / "src"
    (pkg / "mypkg").mkdir(parents=True)
    (pkg / "mypkg" / "__init__.py").write_text(PLUGIN)
    (pkg / "pyproject.toml").write_text(textwrap.dedent('''
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "moeflow-myplugin"
        version = "0.1.0"

        [project.entry-points."moeflow.schedulers"]
        my-sched = "mypkg:MyScheduler"

        [tool.setuptools]
        packages = ["mypkg"]
        '''))
    site = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", "--target", str(site), str(pkg)],
                   check=True, capture_output=True)
    assert (site / "mypkg" / "__init__.py").exists()
    return site


def generate(model: Path, scheduler: str, site: Path) -> list[int]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(
        [sys.executable, "-m", "moeflow", "generate", str(model), "--prompt-ids", "5,17,33,2,99",
         "--max-new-tokens", "8", "--devices", "cpu:0,cpu:1", "--scheduler", scheduler, "--json"],
        check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout)["token_ids"]


def test_installed_plugin_is_selected_by_entry_point_and_by_path(installed_plugin, tiny_factory):
    model = tiny_factory("qwen2_moe")
    baseline = generate(model, "batch-ep", installed_plugin)
    assert generate(model, "my-sched", installed_plugin) == baseline
    assert generate(model, "mypkg:MyScheduler", installed_plugin) == baseline
    listing = subprocess.run(
        [sys.executable, "-c", "from moeflow.scheduler import available; print(available())"],
        capture_output=True, text=True, check=True,
        env=dict(os.environ, PYTHONPATH=str(installed_plugin)))
    assert "my-sched" in listing.stdout


def test_unknown_names_list_what_is_available():
    with pytest.raises(UnknownScheduler, match=r"unknown scheduler 'nope'; available: .*batch-ep"):
        scheduler_class("nope")
    with pytest.raises(UnknownScheduler, match=r"cannot import 'no_such_module'"):
        scheduler_class("no_such_module:Thing")
    with pytest.raises(UnknownScheduler, match=r"has no 'Nothing'"):
        scheduler_class("moeflow.scheduler:Nothing")
    with pytest.raises(UnknownScheduler, match=r"not a moeflow.scheduler.Scheduler subclass"):
        scheduler_class("moeflow.scheduler:Plan")
    assert "batch-ep" in available()


def test_cli_rejects_an_unknown_scheduler(tiny_factory, capsys):
    from moeflow.cli import main

    code = main(["generate", str(tiny_factory("qwen3_moe")), "--prompt-ids", "1,2",
                 "--scheduler", "nope"])
    assert code == 2 and "unknown scheduler 'nope'" in capsys.readouterr().err


def test_a_module_in_the_working_directory_is_found_by_the_command(tmp_path, tiny_factory):
    """`moeflow generate --scheduler mysched:MyScheduler`, run where mysched.py is: found
    as `python -m` would find it (the command's own path starts at its script's
    directory), in this process and in actor processes."""
    (tmp_path / "mysched.py").write_text(PLUGIN)
    command = Path(sys.executable).with_name("moeflow")
    model = tiny_factory("qwen2_moe")
    outs = []
    for transport in ("inproc", "zmq"):
        out = subprocess.run(
            [str(command), "generate", str(model), "--prompt-ids", "5,17,33,2,99",
             "--max-new-tokens", "8", "--devices", "cpu:0,cpu:1", "--transport", transport,
             "--scheduler", "mysched:MyScheduler", "--json"],
            capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        outs.append(json.loads(out.stdout)["token_ids"])
    assert outs[0] == outs[1] == generate(model, "batch-ep", tmp_path)
