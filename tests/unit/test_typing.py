"""The pure packages type-check strictly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STRICT = ["moeflow/scheduler", "moeflow/dataflow", "moeflow/actors/messages.py",
          "moeflow/serve/protocol.py"]


def test_scheduler_dataflow_and_message_schemas_pass_mypy_strict():
    pytest.importorskip("mypy")
    out = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-error-summary",
                          "--cache-dir", str(ROOT / ".mypy_cache"), *STRICT],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
