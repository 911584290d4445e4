"""Building an EngineCore and its executor from a checkpoint directory.

    build_engine_core(model, devices, dtype, scheduler, transport=...) -> EngineCore

The executor is the in-process one (every actor in this process, the default) or actor
processes over ZeroMQ (`transport="zmq"`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moeflow.actors.inproc import InProcessExecutor, load_workers, parse_devices
from moeflow.models.families import load_spec
from moeflow.models.spec import ModelSpec
from moeflow.models.tokenizer import Tokenizer
from moeflow.models.weights import torch_dtype
from moeflow.scheduler.base import Cluster, Scheduler
from moeflow.scheduler.registry import make_scheduler
from moeflow.serve.engine import EngineCore

if TYPE_CHECKING:
    from moeflow.actors.coordinator import ZmqExecutor


def resolve_dtype(dtype: str, checkpoint_dtype: str) -> torch.dtype:
    return torch_dtype(checkpoint_dtype if dtype == "auto" else dtype)


def build_engine_core(model: str | Path, devices: str | Sequence[str] = "cpu:0",
                      dtype: str = "auto", scheduler: str | Scheduler = "batch-ep", *,
                      transport: str = "inproc", kv_cache_tokens: int = 65536,
                      max_batch_tokens: int = 2048, max_seqs: int = 64,
                      record_routing: bool = False, want_logits: bool = False,
                      faults: str = "") -> EngineCore:
    """An EngineCore with its executor, for a caller that drives steps itself. `faults`
    (actor processes only) injects faults into the actors' data plane, for chaos tests:
    see moeflow.actors.plane.Faults."""
    path = Path(model)
    spec = load_spec(path)
    cluster = Cluster.sharded(parse_devices(devices), spec.moe.num_experts)
    executor = make_executor(transport, path, spec, cluster, resolve_dtype(dtype, spec.dtype),
                             kv_cache_tokens, record_routing, want_logits, faults)
    return EngineCore(spec, executor, make_scheduler(scheduler), cluster, Tokenizer.load(path),
                      max_batch_tokens=max_batch_tokens, max_seqs=max_seqs)


TRANSPORTS = ("inproc", "zmq")


def make_executor(transport: str, model_dir: Path, spec: ModelSpec, cluster: Cluster,
                  dtype: torch.dtype, kv_tokens: int, record_routing: bool = False,
                  want_logits: bool = False, faults: str = ""
                  ) -> InProcessExecutor | ZmqExecutor:
    """Actors in this process ("inproc", the default) or one process each ("zmq")."""
    if faults and transport != "zmq":
        raise ValueError("faults are injected into actor processes: use transport='zmq'")
    if transport == "inproc":
        workers = load_workers(model_dir, spec, cluster.placement, dtype, kv_tokens)
        return InProcessExecutor(workers, record_routing=record_routing,
                                 want_logits=want_logits)
    if transport == "zmq":
        from moeflow.actors.coordinator import ZmqExecutor

        return ZmqExecutor(str(model_dir), cluster.placement,
                           str(dtype).removeprefix("torch."), kv_tokens,
                           record_routing=record_routing, want_logits=want_logits,
                           faults=faults)
    raise ValueError(f"unknown transport {transport!r}; expected one of {', '.join(TRANSPORTS)}")
