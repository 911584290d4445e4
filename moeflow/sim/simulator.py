"""The discrete-event simulator: Plans run through the one execution semantics, with the
cost model in place of ops.

It drives a RequestBook exactly as the engine does: requests arrive, the scheduler forms and
plans units whenever work may start, each stream starts its next node by its rule, a
Gate's completion draws per-expert counts from the routing model, and a finished unit gives
each of its sequences a token. Memory is tracked at every event on every device: weights by
placement, KV blocks by the book's ledger, activations while some consumer still needs them.

    sim = Simulator(model, hardware, scheduler, routing)
    result = sim.run(requests)          # SimResult: trace, per-request timings, metrics
    print(result.metrics.table())
    sink = open_trace("run.json")        # moeflow.sim.tracefile: written as it runs
    result = sim.run(requests, record=False, sink=sink)   # memory bounded by the requests
    sink.close(result)

Units of one shape replay one plan, as in the engine (`plan_key`, a PlanCache), with each
unit's sizes bound to it (`moeflow.sim.replay`); costs are computed once per plan slot and
unit. What the run holds grows with the requests and the plans in flight: every finished
plan is released, and per-event records are kept only with `record=True` (the default; the
`trace`, `jobs` and `durations` of the result) or handed to a `sink` as they happen.

Pure: no I/O, no clock of its own, no randomness beyond the seeded routing model.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator, Sequence

from moeflow.dataflow.graph import Placement
from moeflow.models.spec import ModelSpec
from moeflow.scheduler.base import Cluster, Scheduler
from moeflow.scheduler.requests import Job
from moeflow.sim.cost import CostModel
from moeflow.sim.events import Run, TraceSink
from moeflow.sim.hardware import Hardware
from moeflow.sim.replay import node_label
from moeflow.sim.results import (
    Metrics, RequestTiming, SimResult, SimulationError, TraceEvent, busy_of, percentile,
)
from moeflow.sim.workload import Routing, SimRequest

PLAN_CACHE = 16  # plans kept for replay (batch-ep repeats the last few shapes)
# while a run goes (the default is 700, 10, 10): a plan compiled every few steps leaves tens
# of thousands of young objects that live as long as it is cached, and every young
# collection scans them (a tenth of a DeepSeek-V2 run at 50_000, nothing at 1_000_000)
GC_THRESHOLD = (1_000_000, 50, 100)

__all__ = ["Metrics", "RequestTiming", "SimResult", "SimulationError", "Simulator", "TraceEvent",
           "TraceSink", "activation_bytes", "busy_of", "node_label", "percentile"]


def activation_bytes(spec: ModelSpec, tokens: int, seqs: int, dtype_bytes: int) -> float:
    """An upper bound on a device's live activations while `tokens` tokens of `seqs`
    sequences are in flight: each layer holds at most the attention output and residual,
    the gate's rows, routed rows in and out, a shared expert's output and the previous
    layer's output ((6 + 3k) rows of D per token); the MLP of one layer at a time holds its
    intermediates, gate/up and their product (3 rows of the FFN's width for each routed
    row, k a token, and for a shared expert's or a dense layer's); plus fp32 logits per
    sequence. (Without the intermediates, which for Mixtral's F = 14,336 are 1.7x the rest,
    the bound fell short.)"""
    moe = spec.moe
    ffn = 3 * max(moe.top_k * moe.intermediate_size + moe.shared_intermediate_size,
                  spec.dense_intermediate_size)
    per_token = ((6 + 3 * moe.top_k) * spec.hidden_size + ffn) * dtype_bytes
    return tokens * per_token + seqs * spec.vocab_size * 4


class Simulator:
    def __init__(self, model: ModelSpec, hardware: Hardware, scheduler: Scheduler,
                 routing: Routing, *, dtype: str | None = None,
                 placement: Placement | None = None, homes: Sequence[str] | None = None,
                 max_batch_tokens: int = 8192, max_seqs: int = 256, kv_block_size: int = 16,
                 memory_headroom: float = 0.1, plan_cache: int = PLAN_CACHE) -> None:
        self.model = model
        self.hw = hardware
        self.scheduler = scheduler
        self.routing = routing
        self.cost = CostModel(model, hardware, dtype)
        devices = hardware.device_names()
        self.placement = placement or Placement.sharded(devices, model.moe.num_experts)
        self.cluster = Cluster(self.placement.devices, self.placement)
        self.homes = tuple(homes) if homes is not None else self.placement.devices
        self.weights = self.cost.weight_bytes(self.placement, self.homes)
        for dev, params in scheduler.reserved_weights(model, self.cluster).items():
            self.weights[dev] = self.weights.get(dev, 0.0) + params * self.cost.wb
        self.budget = {d: hardware.memory_of(d) * (1 - memory_headroom)
                       for d in self.placement.devices}
        self.activation_reserve = activation_bytes(model, max_batch_tokens, max_seqs,
                                                   self.cost.b)
        per_block = self.cost.kv_bytes_per_token() * kv_block_size
        # where each home's requests keep their KV (their home, unless the policy says)
        self.kv_device = {h: d for h, d in scheduler.kv_devices(model, self.cluster).items()
                          if h in self.homes}
        kv_blocks = {}
        # a home keeping its KV on another device sizes its pool by that device's room
        # (shared with that device's own requests, should it home any: the memory check
        # holds both to the device's budget)
        for home in self.homes:
            dev = self.kv_device.get(home, home)
            if dev != home and self.budget[home] < self.weights[home] + self.activation_reserve:
                raise SimulationError(
                    f"{model.name or model.family} does not fit on {hardware.name}: {home} "
                    f"holds {self.weights[home] / 1e9:.1f} GB of weights and "
                    f"{self.activation_reserve / 1e9:.1f} GB of activations of a "
                    f"{self.budget[home] / 1e9:.1f} GB budget")
            room = self.budget[dev] - self.weights[dev] - self.activation_reserve
            if room < per_block:
                raise SimulationError(
                    f"{model.name or model.family} does not fit on {hardware.name}: {dev} holds "
                    f"{self.weights[dev] / 1e9:.1f} GB of weights of a "
                    f"{self.budget[dev] / 1e9:.1f} GB budget"
                    + (" (fp8 weights would take half: --dtype fp8)" if self.cost.wb > 1
                       and "float8" in hardware.device.peak_flops
                       and self.weights[dev] / self.cost.wb + self.activation_reserve
                       + per_block <= self.budget[dev] else ""))
            kv_blocks[home] = int(room // per_block)
        self.kv_block_size = kv_block_size
        self.kv_bytes_per_block = per_block
        self.kv_blocks = kv_blocks
        self.max_batch_tokens = max_batch_tokens
        self.max_seqs = max_seqs
        self.plan_cache = plan_cache

    # -- the run -------------------------------------------------------------------

    def run(self, requests: Sequence[SimRequest],
            progress: Callable[[int, int], None] | None = None,
            on_plan: Callable[[Job], None] | None = None, *, record: bool = True,
            sink: TraceSink | None = None,
            token_progress: Callable[[int, int], None] | None = None) -> SimResult:
        """Simulate `requests`. `progress(done, total)` is called as requests finish,
        `token_progress(done, total)` as units produce output tokens (of all requests');
        `on_plan(job)` sees every unit's plan before it runs (checks may raise there).
        `record` keeps every event in the result (its memory grows with the events run);
        `sink` sees each as it starts (its `close` is the caller's to call)."""
        with _sparse_gc():
            return Run(self, requests, progress, on_plan, record, sink,
                       token_progress).go()


@contextlib.contextmanager
def _sparse_gc() -> Iterator[None]:
    """Collect cycles less often while the run allocates: it makes next to none, and each
    collection scans every node of the plans held (a quarter of the run time otherwise)."""
    before = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD[0], *GC_THRESHOLD[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)
