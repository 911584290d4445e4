"""The in-process transport: every actor's core in this process, messages handed over as
objects (tensors by reference, nothing encoded). The embedded default, and the reference
the other executors are checked against.

Work runs one node at a time: deliver every queued message, then start what each actor's
idle streams may start and run those nodes in turn, until the jobs asked for are done.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from moeflow.actors.cluster import CoordinatorCore, JobResult, JobSpec, run_jobs
from moeflow.actors.core import COORDINATOR, ActorCore, OnRouting, Outgoing
from moeflow.actors.messages import Abort, DropPlans, Release
from moeflow.actors.tracing import RealTrace
from moeflow.actors.worker import DeviceWorker
from moeflow.dataflow.graph import Placement
from moeflow.models.checkpoint import Checkpoint
from moeflow.models.spec import ModelSpec
from moeflow.models.weights import WeightLoader
from moeflow.scheduler.plan import Plan, Stream
from moeflow.scheduler.semantics import SemanticsError


def parse_devices(devices: str | Sequence[str]) -> tuple[str, ...]:
    """'cpu:0,cpu:1' or ['cpu:0', 'cpu:1'] -> ('cpu:0', 'cpu:1'), checked."""
    items = devices.split(",") if isinstance(devices, str) else list(devices)
    names = tuple(d.strip() for d in items if d.strip())
    if not names:
        raise ValueError("at least one device is needed, e.g. 'cpu:0'")
    for name in names:
        kind, _, index = name.partition(":")
        if kind not in ("cpu", "cuda") or not index.isdigit():
            raise ValueError(f"bad device {name!r}: expected 'cpu:N' or 'cuda:N'")
    if len(set(names)) != len(names):
        raise ValueError(f"device listed twice in {','.join(names)}")
    return names


def load_worker(model_dir: str | Path, spec: ModelSpec, placement: Placement, device: str,
                dtype: torch.dtype, kv_tokens: int, loader: WeightLoader | None = None,
                dense: object | None = None) -> DeviceWorker:
    """One device's worker: the dense weights (shared if given) and the experts it owns."""
    loader = loader or WeightLoader(spec, Checkpoint(model_dir), dtype)
    owned = placement.experts_of(device)
    experts = {layer: loader.experts(layer, owned) for layer in spec.moe_layers} if owned else {}
    return DeviceWorker(device, spec, dtype, dense or loader.dense(), experts,  # type: ignore[arg-type]
                        kv_tokens)


def load_workers(model_dir: str | Path, spec: ModelSpec, placement: Placement,
                 dtype: torch.dtype, kv_tokens: int) -> dict[str, DeviceWorker]:
    """One worker per placement device. Virtual devices in one process share the dense
    weights (one copy) and each stacks only the experts it owns."""
    loader = WeightLoader(spec, Checkpoint(model_dir), dtype)
    dense = loader.dense()
    return {d: load_worker(model_dir, spec, placement, d, dtype, kv_tokens, loader, dense)
            for d in placement.devices}


Observer = Callable[[Plan, int, Stream], None]


class InProcessExecutor:
    """`observer(plan, node_id, stream)`, if given, is called as each node runs.
    `want_logits` returns logits with every result (tests); `record_routing` sums the
    rows routed to each expert per layer; `trace` writes a Chrome trace of every node run
    (see moeflow.actors.tracing), complete once the executor is closed; `on_routing`, a
    scheduler's, picks routed experts' kernels (moeflow.scheduler.base)."""

    def __init__(self, workers: dict[str, DeviceWorker], observer: Observer | None = None,
                 record_routing: bool = False, want_logits: bool = False,
                 trace: str | os.PathLike[str] | None = None,
                 on_routing: OnRouting | None = None) -> None:
        self.workers = workers
        self.actors = {name: ActorCore(name, w, on_routing) for name, w in workers.items()}
        self.observer = observer
        # tensors are handed over by reference here: a transfer spans its run alone
        tracer = None if trace is None else RealTrace(trace, transfers_until_arrival=False)
        self.coordinator = CoordinatorCore(workers, want_logits, record_routing, tracer)
        self.mail: deque[Outgoing] = deque()
        self._ids = itertools.count(1 << 40)  # ids for ad-hoc runs, apart from the engine's

    @property
    def kv_block_size(self) -> int:
        return next(iter(self.workers.values())).kv.block_size

    def kv_capacity_blocks(self) -> dict[str, int]:
        """KV-cache blocks each device that serves requests can hold."""
        return {d: w.kv.max_blocks for d, w in self.workers.items() if w.dense is not None}

    def free_kv_blocks(self) -> dict[str, int]:
        """Blocks each serving device could still hand out (for checks)."""
        return {d: w.kv.num_free_blocks for d, w in self.workers.items() if w.dense is not None}

    # -- jobs ----------------------------------------------------------------------

    @property
    def routing(self) -> dict[int, list[int]] | None:
        return self.coordinator.routing

    @property
    def want_logits(self) -> bool:
        return self.coordinator.want_logits

    @want_logits.setter
    def want_logits(self, value: bool) -> None:
        self.coordinator.want_logits = value

    def submit(self, job: JobSpec) -> None:
        for actor, msg in self.coordinator.submit(job):
            self.mail.append(Outgoing(actor, msg))

    def poll(self, timeout: float | None = None) -> list[JobResult]:
        """Run until some submitted job finishes (or none is left); `timeout` is moot here,
        since nothing runs concurrently."""
        tracker = self.coordinator.tracker
        while not self.coordinator.done and len(tracker):
            if not self._deliver() and not self._run_ready():
                # nothing can run and nothing is in the mail: a lost message, or a plan
                # that cannot complete; its jobs fail, the executor goes on
                self._fail(tracker.involving_any(),
                           "stalled: no node of the job can run (a lost message?)")
        return self.coordinator.take_done()

    def drop_plans(self, plan_ids: list[int]) -> None:
        """Cached plans that will not run again: each actor holding one forgets it."""
        for actor, held in self.coordinator.drop_plans(plan_ids).items():
            self.actors[actor].handle(DropPlans(held))

    def watch(self) -> list[str]:
        """Devices whose state was lost since the last call: never, in one process."""
        return []

    def run_many(self, jobs: list[JobSpec]) -> list[JobResult]:
        return run_jobs(self, jobs)

    def run(self, plan: Plan, tokens: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        """Run one plan with no sampling and return its logits per unit seq index."""
        want, self.want_logits = self.want_logits, True
        try:
            [result] = self.run_many([JobSpec(next(self._ids), plan, tokens)])
        finally:
            self.want_logits = want
        if result.error:
            raise RuntimeError(result.error)
        return result.logits

    def release(self, home: str, seq_id: int) -> None:
        # every actor: a policy may keep a request's KV off its home (cgopipe's host)
        for actor in self.actors.values():
            actor.handle(Release((seq_id,)))

    def close(self) -> None:
        self.coordinator.close_trace()

    def __del__(self) -> None:  # a trace is complete even if the caller never closes
        with contextlib.suppress(Exception):
            self.coordinator.close_trace()

    # -- the loop ------------------------------------------------------------------

    def _deliver(self) -> bool:
        delivered = False
        while self.mail:
            out = self.mail.popleft()
            delivered = True
            if out.to == COORDINATOR:
                self._to_coordinator(out)
            else:
                self.mail.extend(self.actors[out.to].handle(out.msg))
        return delivered

    def _to_coordinator(self, out: Outgoing) -> None:
        self._abort(self.coordinator.reply(out.msg))

    def _fail(self, unit_ids: list[int], error: str) -> None:
        self._abort(self.coordinator.fail(unit_ids, error))

    def _abort(self, failed: list[int]) -> None:
        if failed:
            for actor in self.actors.values():
                actor.handle(Abort(tuple(failed)))

    def _run_ready(self) -> bool:
        ran = False
        for actor in self.actors.values():
            for group in actor.start_tasks():
                if self.observer is not None:
                    for task in group:
                        plan = actor.by_index[task[0]].plan
                        self.observer(plan, task[1], plan.assignment[task[1]])
                try:
                    values = actor.run(group)
                except SemanticsError:
                    raise
                except Exception as exc:  # a failing op fails its units, not the executor
                    for task in group:
                        self.mail.extend(actor.fail(task, exc))
                else:
                    for task, value in zip(group, values):
                        self.mail.extend(actor.finish(task, value))
                ran = True
        return ran
