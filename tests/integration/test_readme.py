"""The README's examples run as written, each in a fresh interpreter, and exit by
themselves (the checkpoint path is the only thing swapped in)."""

from __future__ import annotations

import json
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def path(tiny_factory):
    return tiny_factory("qwen3_moe")


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_examples_run_and_exit_by_themselves(path, index):
    code = blocks("python")[index].replace("path/to/checkpoint", str(path))
    # no close() in the example: the interpreter must still exit on its own
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=180, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip()


def test_the_command_line_examples_run(tmp_path):
    [usage] = [b for b in blocks("sh") if "moeflow make-tiny" in b]
    for line in usage.strip().splitlines():
        command = line.split("#")[0].replace("/tmp/tiny", str(tmp_path / "tiny"))
        command = command.replace("graph.html", str(tmp_path / "graph.html"))
        argv = shlex.split(command)
        assert argv[0] == "moeflow"
        run = subprocess.run([sys.executable, "-m", "moeflow.cli", *argv[1:]],
                             capture_output=True, text=True, timeout=180,
                             stdin=subprocess.DEVNULL)
        assert run.returncode == 0, (line, run.stderr[-3000:])
    assert (tmp_path / "graph.html").stat().st_size > 0


def sh_lines(block: str) -> list[str]:
    """A shell block's commands: continuation lines joined, comments dropped."""
    return [line.split("#")[0].strip() for line in block.replace("\\\n", " ").splitlines()
            if line.split("#")[0].strip()]


def moeflow(command: str, **kwargs) -> subprocess.CompletedProcess[str]:
    argv = shlex.split(command)
    assert argv[0] == "moeflow"
    return subprocess.run([sys.executable, "-m", "moeflow.cli", *argv[1:]], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, **kwargs)


def test_the_actor_simulate_and_plan_examples_run(path, tmp_path):
    examples = [line for b in blocks("sh") for line in sh_lines(b)
                if line.startswith(("moeflow generate /tmp/tiny --prompt \"Once upon a time\" "
                                    "--devices", "moeflow simulate", "moeflow plan"))
                and "cgopipe" not in line]  # those: tests/integration/test_cgopipe.py
    assert len(examples) == 4
    for line in examples:
        command = line.replace("/tmp/tiny", str(path)).replace(
            "out.json", str(tmp_path / "out.json")).replace("run.json", str(tmp_path / "run.json"))
        run = moeflow(command, timeout=600)
        assert run.returncode == 0, (line, run.stderr[-3000:])
        assert run.stdout.strip()
    assert (tmp_path / "out.json").stat().st_size > 0
    real = json.loads((tmp_path / "run.json").read_text())  # the trace of a real run
    assert real["metadata"]["source"] == "real run" and real["metadata"]["num_nodes"] > 0


def test_the_serve_and_bench_example_runs(path, tmp_path):
    [block] = [b for b in blocks("sh") if "moeflow serve" in b]
    serve, *benches = sh_lines(block)
    assert len(benches) == 2 and "--backend openai" in benches[1]
    port, http = _free_port(), _free_port()
    serve = serve.replace("/tmp/tiny", str(path)).replace("5555", str(port))
    serve = serve.replace("8000", str(http))
    benches = [b.replace("5555", str(port)).replace("8000", str(http)).replace(
        "bench.json", str(tmp_path / "bench.json")) for b in benches]
    serve = serve.replace("--metrics-port 9100", f"--metrics-port {_free_port()}")
    argv = shlex.split(serve)
    server = subprocess.Popen([sys.executable, "-m", "moeflow.cli", *argv[1:]],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              stdin=subprocess.DEVNULL, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().startswith("serving")
        for bench in benches:
            run = moeflow(bench, timeout=300)
            assert run.returncode == 0, run.stderr[-3000:]
            assert "0 errors" in run.stdout, run.stdout
        assert (tmp_path / "bench.json").stat().st_size > 0
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=60) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
