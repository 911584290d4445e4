"""EngineConfig: everything that builds an engine, taken alike by `moeflow.LLM`,
`moeflow.AsyncEngine`, the request server and the command line.

Frozen and checked on construction (a bad value fails here, with the field's name, before
any weights load); no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

TRANSPORTS = ("inproc", "zmq")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """`scheduler`: a name (`batch-ep`, `fine-ep`, `eps`, `cgopipe`, `flexgen`, an entry
    point, `module:Class`) or a Scheduler. `devices`: "cpu:0,cpu:1" or a sequence of names. `transport`: actors in this
    process ("inproc") or one process per device ("zmq"). `max_waiting`: requests in
    progress beyond which a new one gets OverloadedError. `faults`: chaos testing only
    (zmq): drop/delay the actors' data messages, see moeflow.actors.plane.Faults.
    `gpu_memory` ("512KB", "2GB" or bytes): for cgopipe and flexgen, the weights the first
    device (the GPU) may hold; the experts beyond it stay on the last (its host) and are
    paged in. `trace`: a path ending in .json: a Chrome trace of every node the actors run
    (moeflow.actors.tracing), complete once the engine stops; after an engine restart the
    trace goes on in FILE.restartN.json, and the file before it is kept.
    `hardware` (cgopipe named as "cgopipe" only): the machine the engine runs on, as the
    simulator describes it (a preset such as "t4" or "h100", or a `moeflow calibrate` file;
    on a CPU-only machine its CPU stands for the GPU and the host alike): MoE-Lightning's
    HRM searches the policy for it and `lengths`, and cgopipe takes its micro-batch size;
    the GPU's memory is `gpu_memory` when capped. `lengths` ("PROMPT:GEN", or a pair): the
    mean prompt and generated tokens HRM plans for (default 77:128, MTBench-like)."""

    model: str
    scheduler: Any = "batch-ep"
    devices: str | Sequence[str] = "cpu:0"
    dtype: str = "auto"
    transport: str = "inproc"
    kv_cache_tokens: int = 65536
    max_batch_tokens: int = 2048
    max_seqs: int = 64
    max_waiting: int = 1024
    record_routing: bool = False
    faults: str = ""
    gpu_memory: str | float | None = None
    trace: str | None = None
    hardware: str | None = None
    lengths: str | tuple[int, int] | None = None

    def __post_init__(self) -> None:
        from moeflow.actors.inproc import parse_devices  # the command line imports this module
        from moeflow.actors.plane import Faults  # before it needs torch or zmq

        object.__setattr__(self, "model", str(self.model))
        object.__setattr__(self, "devices", parse_devices(self.devices))
        gpus = [int(d.partition(":")[2]) for d in self.devices if d.startswith("cuda")]
        if gpus:  # found here, before any weight loads or actor starts
            import torch

            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count == 0:
                raise ValueError(f"device cuda:{gpus[0]} needs CUDA, which this machine "
                                 f"lacks (or this torch build has no CUDA): use cpu:N")
            if max(gpus) >= count:
                raise ValueError(f"device cuda:{max(gpus)} is not on this machine: it has "
                                 f"{count} GPU(s), cuda:0..cuda:{count - 1}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got "
                             f"{self.transport!r}")
        for name in ("kv_cache_tokens", "max_batch_tokens", "max_seqs", "max_waiting"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        Faults.parse(self.faults)
        if self.gpu_memory is not None:
            from moeflow.units import parse_bytes

            size = parse_bytes(self.gpu_memory)
            if size <= 0:
                raise ValueError(f"gpu_memory must be > 0, got {self.gpu_memory!r}")
            object.__setattr__(self, "gpu_memory", size)
        if self.faults and self.transport != "zmq":
            raise ValueError("faults are injected into actor processes: use transport='zmq'")
        if self.lengths is not None:
            object.__setattr__(self, "lengths", parse_lengths(self.lengths))
            if self.hardware is None:
                raise ValueError("lengths are what HRM plans cgopipe's policy for: give the "
                                 "hardware it searches on too")
        if self.hardware is not None:
            object.__setattr__(self, "hardware", str(self.hardware))
        if self.trace is not None:
            object.__setattr__(self, "trace", str(self.trace))
            if not self.trace.lower().endswith(".json"):
                raise ValueError(f"trace must be a path ending in .json (a Chrome trace), "
                                 f"got {self.trace!r}")


DEFAULT_LENGTHS = (77, 128)  # HRM's workload when none is given: MTBench's mean prompt


def parse_lengths(value: str | tuple[int, int]) -> tuple[int, int]:
    """"PROMPT:GEN" or (prompt, gen) -> (prompt >= 1, gen >= 2) mean tokens."""
    if isinstance(value, str):
        parts = value.split(":")
        try:
            pair = tuple(int(p) for p in parts)
        except ValueError:
            pair = ()
    else:
        pair = tuple(value)
    if (len(pair) != 2 or not all(isinstance(n, int) for n in pair)
            or pair[0] < 1 or pair[1] < 2):
        raise ValueError(f"lengths must be PROMPT:GEN mean tokens, a prompt >= 1 and >= 2 "
                         f"generated (HRM counts the decode steps after the first), got "
                         f"{value!r}")
    return pair[0], pair[1]
