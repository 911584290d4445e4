"""Building an EngineCore and its executor from a checkpoint directory.

    build_engine_core(EngineConfig(model, ...)) -> EngineCore
    build_engine_core(model, devices=..., scheduler=..., ...) -> EngineCore

The executor is the in-process one (every actor in this process, the default) or actor
processes over ZeroMQ (`transport="zmq"`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moeflow.actors.inproc import InProcessExecutor, load_workers
from moeflow.models.checkpoint import Checkpoint
from moeflow.models.families import load_spec
from moeflow.models.spec import ModelSpec
from moeflow.models.tokenizer import Tokenizer
from moeflow.models.weights import torch_dtype
from moeflow.scheduler.base import Cluster, Scheduler, routes
from moeflow.scheduler.cgopipe import CGOPipe
from moeflow.scheduler.eps import EPS, cpu_kernel_band
from moeflow.scheduler.registry import make_scheduler
from moeflow.serve.config import DEFAULT_LENGTHS, TRANSPORTS, EngineConfig
from moeflow.serve.engine import EngineCore

if TYPE_CHECKING:
    from moeflow.actors.coordinator import ZmqExecutor

policy_log = logging.getLogger("moeflow.policy")  # what a searched policy chose


def resolve_dtype(dtype: str, checkpoint_dtype: str) -> torch.dtype:
    return torch_dtype(checkpoint_dtype if dtype == "auto" else dtype)


def build_engine_core(config: EngineConfig | str | Path, *, want_logits: bool = False,
                      **options: Any) -> EngineCore:
    """An EngineCore with its executor, for a caller that drives steps itself: from an
    EngineConfig, or a checkpoint path and EngineConfig's fields as `options`."""
    if not isinstance(config, EngineConfig):
        config = EngineConfig(str(config), **options)
    elif options:
        raise TypeError("pass options in the EngineConfig, not beside it")
    path = Path(config.model)
    spec = load_spec(path)
    scheduler = make_scheduler(config.scheduler)
    dtype = resolve_dtype(config.dtype, spec.dtype)
    if (isinstance(config.scheduler, str) and isinstance(scheduler, EPS)
            and all(d.startswith("cpu") for d in config.devices)):
        # named, so not configured: its expert kernels by the CPU kernels' crossover
        from moeflow.ops.cpu.choice import ALL_ROWS, kernel_choice

        # 0: no kernels; every size: the grouped kernel always wins. No choice either way
        crossover = kernel_choice().expert_limit(dtype)
        scheduler.kernel_band = (cpu_kernel_band(crossover) if 0 < crossover < ALL_ROWS
                                 else None)
    cluster = make_cluster(config, spec, scheduler, dtype)  # a cap too small: refused here
    if config.hardware is not None:
        scheduler = searched_cgopipe(config, spec, scheduler, dtype)
    executor = make_executor(config.transport, path, spec, cluster, dtype,
                             config.kv_cache_tokens, config.record_routing, want_logits,
                             config.faults, config.trace, scheduler)
    try:
        return EngineCore(spec, executor, scheduler, cluster,
                          Tokenizer.load(path), max_batch_tokens=config.max_batch_tokens,
                          max_seqs=config.max_seqs)
    except BaseException:
        executor.close()  # its actor processes, its trace
        raise


def searched_cgopipe(config: EngineConfig, spec: ModelSpec, scheduler: Scheduler,
                     dtype: torch.dtype) -> CGOPipe:
    """cgopipe with the micro-batch size of HRM's policy on `config.hardware` for
    `config.lengths`, its GPU's memory the `gpu_memory` cap where there is one; logged on
    the "moeflow.policy" logger. HRM's memory model is its own: where it keeps every
    expert on the GPU (r_w = 1) the cap may still page some in."""
    if not (isinstance(config.scheduler, str) and type(scheduler) is CGOPipe):
        name = config.scheduler if isinstance(config.scheduler, str) else type(scheduler).__name__
        raise ValueError(f"hardware is what cgopipe's policy search runs on: it takes "
                         f"scheduler='cgopipe', not {name!r} (a CGOPipe given as an object "
                         f"keeps its own micro-batches)")
    from moeflow.sim.hrm import Workload
    from moeflow.sim.hrm_search import hrm_cgopipe, load_system, with_gpu_memory

    assert config.hardware is not None
    system = load_system(config.hardware, str(dtype).removeprefix("torch."))
    if config.gpu_memory is not None:  # less the embedding and the LM head, which the cap
        # holds and HRM's model of the GPU's weights leaves out
        outside = (spec.vocab_size * spec.hidden_size * dtype.itemsize
                   * (1 if spec.tie_word_embeddings else 2))
        system = with_gpu_memory(system, float(config.gpu_memory) - outside)
    lengths = config.lengths if isinstance(config.lengths, tuple) else DEFAULT_LENGTHS
    chosen, line = hrm_cgopipe(spec, system, Workload(*lengths), config.max_seqs)
    policy_log.info("%s", line)
    return chosen


def make_cluster(config: EngineConfig, spec: ModelSpec, scheduler: Scheduler,
                 dtype: torch.dtype) -> Cluster:
    """Experts sharded over the devices; under a GPU memory cap, as the paging policy
    places them."""
    if config.gpu_memory is None:
        return Cluster.sharded(config.devices, spec.moe.num_experts)
    if not isinstance(scheduler, CGOPipe):
        raise ValueError(f"gpu_memory caps the GPU of a paging policy (cgopipe, flexgen), "
                         f"not {scheduler.name or type(scheduler).__name__}")
    placement = scheduler.capped_placement(spec, config.devices, dtype.itemsize,
                                           float(config.gpu_memory))
    return Cluster(placement.devices, placement)


def make_executor(transport: str, model_dir: Path, spec: ModelSpec, cluster: Cluster,
                  dtype: torch.dtype, kv_tokens: int, record_routing: bool = False,
                  want_logits: bool = False, faults: str = "", trace: str | None = None,
                  scheduler: Scheduler | None = None) -> InProcessExecutor | ZmqExecutor:
    """Actors in this process ("inproc", the default) or one process each ("zmq");
    `trace`, a Chrome trace of every node they run; `scheduler`, whose `on_routing` (if it
    has one) picks the actors' expert kernels."""
    if faults and transport != "zmq":
        raise ValueError("faults are injected into actor processes: use transport='zmq'")
    if transport == "inproc":
        workers = load_workers(model_dir, spec, cluster.placement, dtype, kv_tokens)
        return InProcessExecutor(workers, record_routing=record_routing,
                                 want_logits=want_logits, trace=trace,
                                 on_routing=scheduler.on_routing
                                 if scheduler is not None and routes(scheduler) else None)
    if transport == "zmq":
        from moeflow.actors.coordinator import ZmqExecutor

        # the actors open the weights; their files are checked here first (headers only),
        # so a missing or truncated shard is the same one-line error as in process
        Checkpoint(model_dir)
        return ZmqExecutor(str(model_dir), cluster.placement,
                           str(dtype).removeprefix("torch."), kv_tokens,
                           record_routing=record_routing, want_logits=want_logits,
                           faults=faults, trace=trace, scheduler=scheduler)
    raise ValueError(f"unknown transport {transport!r}; expected one of {', '.join(TRANSPORTS)}")
