"""Shared fixtures: tiny checkpoints built once per session, Hypothesis profiles, the
`gpu` marker's skip, and a look at a mapping's flags (`vm_flags`)."""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import moeflow.testing  # registers the Hypothesis profiles and loads the chosen one

if not torch.cuda.is_available():  # Triton kernels run in its interpreter, whichever test
    os.environ.setdefault("TRITON_INTERPRET", "1")  # imports them first

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3",
            "gpt_oss")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """tiny_factory(family, **make_tiny kwargs) -> checkpoint dir, built once per arguments."""
    from moeflow.models.tiny import make_tiny

    cache: dict[str, Path] = {}

    def build(family: str, **kwargs: Any) -> Path:
        key = family + json.dumps(kwargs, sort_keys=True, default=str)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{family}")
            cache[key] = make_tiny(family, out, **kwargs)
        return cache[key]

    return build


class StepRunner:
    """Drives an LLM's executor one forward pass at a time, returning logits: the same
    plans the engine runs, without sampling in between."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        engine = llm.engine
        self.spec, self.executor = engine.spec, engine.executor
        self.scheduler, self.cluster = engine.scheduler, engine.cluster
        self.lengths: dict[int, int] = {}

    def forward(self, chunks: dict[int, list[int]], logits: str = "last",
                homes: dict[int, str] | None = None) -> dict[int, Any]:
        """chunks: seq id -> new tokens. Returns seq id -> logits [rows, V]."""
        from moeflow.dataflow import SeqChunk, Unit

        devices = self.cluster.devices
        seqs = tuple(SeqChunk(s, self.lengths.get(s, 0), len(toks),
                              (homes or {}).get(s, devices[s % len(devices)]), logits)
                     for s, toks in chunks.items())
        unit = Unit(seqs)
        plan = self.scheduler.plan(unit, self.spec, self.cluster)
        out = self.executor.run(plan, {i: chunks[c.seq_id] for i, c in enumerate(seqs)})
        for c in seqs:
            self.lengths[c.seq_id] = c.start + c.num_tokens
        return {c.seq_id: out[i] for i, c in enumerate(seqs)}


@pytest.fixture
def step_runner() -> Callable[[Any], StepRunner]:
    return StepRunner


def _vm_flags(address: int) -> list[str] | None:
    """The VmFlags of this process's mapping that holds `address` (None: none does); "hg"
    among them: advised for transparent huge pages."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    return None


@pytest.fixture
def vm_flags() -> Callable[[int], list[str] | None]:
    if not Path("/proc/self/smaps").exists() or not hasattr(mmap, "MADV_HUGEPAGE"):
        pytest.skip("transparent huge pages are Linux's")
    return _vm_flags
