"""The README's examples run as written, each in a fresh interpreter, and exit by
themselves (the checkpoint path is the only thing swapped in)."""

from __future__ import annotations

import re
import shlex
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
