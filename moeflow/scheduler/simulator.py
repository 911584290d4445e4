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

Pure: no I/O, no clock of its own, no randomness beyond the seeded routing model.
"""

from __future__ import annotations

import heapq
import itertools
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from moeflow.dataflow.graph import (
    Attention, Combine, Embed, Expert, Gate, Graph, LMHead, Node, Placement, Transfer,
)
from moeflow.models.spec import ModelSpec
from moeflow.scheduler.base import Cluster, Scheduler
from moeflow.scheduler.cost import CostModel
from moeflow.scheduler.hardware import Hardware
from moeflow.scheduler.requests import Job, RequestBook, SchedulingError
from moeflow.scheduler.semantics import Execution, SemanticsError, Task
from moeflow.scheduler.workload import Routing, SimRequest


class SimulationError(RuntimeError):
    """The run cannot go on: a deadlock, a model that does not fit, a broken budget."""


@dataclass(frozen=True, slots=True)
class TraceEvent:
    resource: str  # "actor/stream"
    name: str
    kind: str
    job: int
    node: int
    layer: int | None
    start: float
    end: float
    group: int = 0  # nodes coalesced into one kernel share a group id
    ready_order: int = 0  # when it became ready and started, in event order (ties in time
    start_order: int = 0  # are ordered too: a zero-duration node finishes "after" a start)


@dataclass(frozen=True, slots=True)
class RequestTiming:
    seq_id: int
    arrival: float
    first_token: float
    finish: float
    prompt: int
    output: int

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def e2e(self) -> float:
        return self.finish - self.arrival

    @property
    def tpot(self) -> float:
        return (self.finish - self.first_token) / (self.output - 1) if self.output > 1 else 0.0


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class Metrics:
    num_requests: int
    makespan: float
    output_tokens: int
    throughput: float  # output tokens / s
    request_rate: float  # finished requests / s
    ttft: dict[str, float]
    tpot: dict[str, float]
    e2e: dict[str, float]
    utilization: dict[str, float]
    peak_memory: dict[str, float]
    memory_budget: dict[str, float]
    num_preemptions: int = 0

    @staticmethod
    def of(timings: Sequence[RequestTiming], trace: Sequence[TraceEvent],
           peak: dict[str, float], budget: dict[str, float], preemptions: int) -> Metrics:
        start = min((t.arrival for t in timings), default=0.0)
        end = max((t.finish for t in timings), default=0.0)
        span = max(end - start, 1e-12)
        busy: dict[str, float] = {}
        for ev in trace:
            busy[ev.resource] = busy.get(ev.resource, 0.0) + ev.end - ev.start

        def stats(values: list[float]) -> dict[str, float]:
            return {"p50": percentile(values, 50), "p90": percentile(values, 90),
                    "p99": percentile(values, 99),
                    "mean": statistics.fmean(values) if values else float("nan")}

        tokens = sum(t.output for t in timings)
        return Metrics(
            len(timings), span, tokens, tokens / span, len(timings) / span,
            stats([t.ttft for t in timings]),
            stats([t.tpot for t in timings if t.output > 1]),
            stats([t.e2e for t in timings]),
            {r: b / span for r, b in sorted(busy.items())}, peak, budget, preemptions)

    def table(self) -> str:
        ms = 1e3
        lines = [
            f"requests            {self.num_requests}",
            f"makespan            {self.makespan:.3f} s",
            f"throughput          {self.throughput:.1f} output tok/s, "
            f"{self.request_rate:.2f} req/s",
        ]
        for name, st in (("TTFT", self.ttft), ("TPOT", self.tpot), ("end-to-end", self.e2e)):
            lines.append(f"{name:19s} p50 {st['p50'] * ms:9.2f} ms   p90 {st['p90'] * ms:9.2f} ms"
                         f"   p99 {st['p99'] * ms:9.2f} ms")
        lines.append("utilization         " + "  ".join(
            f"{r} {u:.0%}" for r, u in self.utilization.items()))
        lines.append("peak memory         " + "  ".join(
            f"{d} {self.peak_memory[d] / 1e9:.1f}/{self.memory_budget[d] / 1e9:.1f} GB"
            for d in self.peak_memory))
        if self.num_preemptions:
            lines.append(f"preemptions         {self.num_preemptions}")
        return "\n".join(lines)


@dataclass
class SimResult:
    trace: list[TraceEvent]
    timings: list[RequestTiming]
    metrics: Metrics
    jobs: list[Job]
    durations: dict[tuple[int, int], float] = field(default_factory=dict)  # (job, node) -> s
    memory_violations: list[str] = field(default_factory=list)

    def stream_orders(self) -> dict[str, list[tuple[int, int]]]:
        """Per resource, the (job, node) it ran, in start order."""
        out: dict[str, list[tuple[int, int]]] = {}
        for ev in sorted(self.trace, key=lambda e: (e.start, e.end)):
            out.setdefault(ev.resource, []).append((ev.job, ev.node))
        return out


def node_label(node: Node) -> str:
    if isinstance(node, Transfer):
        return f"{node.payload} {node.src}->{node.dst} L{node.layer}"
    if isinstance(node, Expert):
        what = node.kind if node.kind != "routed" else (
            f"e{node.experts[0]}-{node.experts[-1]}" if node.experts else "e-")
        return f"Expert L{node.layer} {what}"
    layer = getattr(node, "layer", None)
    return type(node).__name__ + ("" if layer is None else f" L{layer}")


def activation_bytes(spec: ModelSpec, tokens: int, seqs: int, dtype_bytes: int) -> float:
    """An upper bound on a device's live activations while `tokens` tokens of `seqs`
    sequences are in flight: each layer holds at most the attention output and residual,
    the gate's rows, routed rows in and out, a shared expert's output and the previous
    layer's output ((6 + 3k) rows of D per token), plus fp32 logits per sequence."""
    per_token = (6 + 3 * spec.moe.top_k) * spec.hidden_size * dtype_bytes
    return tokens * per_token + seqs * spec.vocab_size * 4


class Simulator:
    def __init__(self, model: ModelSpec, hardware: Hardware, scheduler: Scheduler,
                 routing: Routing, *, dtype: str | None = None,
                 placement: Placement | None = None, homes: Sequence[str] | None = None,
                 max_batch_tokens: int = 8192, max_seqs: int = 256, kv_block_size: int = 16,
                 memory_headroom: float = 0.1) -> None:
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
        self.budget = {d: hardware.device.memory * (1 - memory_headroom)
                       for d in self.placement.devices}
        self.activation_reserve = activation_bytes(model, max_batch_tokens, max_seqs,
                                                   self.cost.b)
        per_block = self.cost.kv_bytes_per_token() * kv_block_size
        kv_blocks = {}
        for dev in self.homes:
            room = self.budget[dev] - self.weights[dev] - self.activation_reserve
            if room < per_block:
                raise SimulationError(
                    f"{model.name or model.family} does not fit on {hardware.name}: {dev} holds "
                    f"{self.weights[dev] / 1e9:.1f} GB of weights of a "
                    f"{self.budget[dev] / 1e9:.1f} GB budget")
            kv_blocks[dev] = int(room // per_block)
        self.kv_block_size = kv_block_size
        self.kv_bytes_per_block = per_block
        self.kv_blocks = kv_blocks
        self.max_batch_tokens = max_batch_tokens
        self.max_seqs = max_seqs

    # -- the run -------------------------------------------------------------------

    def run(self, requests: Sequence[SimRequest],
            progress: Callable[[int, int], None] | None = None,
            on_plan: Callable[[Job], None] | None = None) -> SimResult:
        """Simulate `requests`. `progress(done, total)` is called as requests finish;
        `on_plan(job)` sees every unit's plan before it runs (checks may raise there)."""
        return _Run(self, requests, progress, on_plan).go()


class _Run:
    def __init__(self, sim: Simulator, requests: Sequence[SimRequest],
                 progress: Callable[[int, int], None] | None,
                 on_plan: Callable[[Job], None] | None) -> None:
        self.sim = sim
        self.requests = list(requests)
        self.progress = progress
        self.on_plan = on_plan
        self.book = RequestBook(sim.scheduler, sim.model, sim.cluster, sim.kv_blocks,
                                sim.kv_block_size, max_batch_tokens=sim.max_batch_tokens,
                                max_seqs=sim.max_seqs)
        self.execution = Execution()
        self.jobs: list[Job] = []  # by plan index in the execution
        self.events: list[tuple[float, int, str, object]] = []
        self.seq = itertools.count()
        self.now = 0.0
        self.trace: list[TraceEvent] = []
        self.durations: dict[tuple[int, int], float] = {}
        self.counts: dict[tuple[int, int], tuple[int, ...]] = {}  # (plan, gate node) -> rows
        self.gates: dict[int, dict[tuple[int, str], int]] = {}  # plan -> (layer, home) -> gate
        self.layer_gates: dict[int, dict[int, list[int]]] = {}  # plan -> layer -> gates
        self.uses: dict[int, list[int]] = {}
        self.live: dict[tuple[int, int], tuple[str, float]] = {}  # outputs held: device, bytes
        self.activations = {d: 0.0 for d in sim.placement.devices}
        self.peak = {d: sim.weights[d] for d in sim.placement.devices}
        self.violations: list[str] = []
        self.targets: dict[int, SimRequest] = {}
        self.order = itertools.count()
        self.ready_at: dict[Task, int] = {}
        # livelock guard: units completed since a token was last produced. Every unit
        # moves some sequence forward, so a healthy run cannot need more than a few times
        # the workload's tokens between two tokens, even with recomputation
        self.idle_units = 0
        self.idle_limit = 4 * sum(r.prompt + r.output for r in self.requests) + 1000
        self.first: dict[int, float] = {}
        self.timings: list[RequestTiming] = []

    def push(self, t: float, kind: str, data: object) -> None:
        heapq.heappush(self.events, (t, next(self.seq), kind, data))

    def go(self) -> SimResult:
        for i, r in enumerate(self.requests):
            self.push(r.arrival, "arrive", (i, r))
        while self.events:
            self.now = self.events[0][0]
            changed = False
            while self.events and self.events[0][0] == self.now:
                _, _, kind, data = heapq.heappop(self.events)
                if kind == "arrive":
                    i, r = data  # type: ignore[misc]
                    self.targets[i] = r
                    self.book.add(i, r.prompt, r.output, self.now)
                    changed = True
                else:
                    changed |= self._finish_node(data)  # type: ignore[arg-type]
            if changed:
                self._schedule()
            self._start_ready()
            if not self.events and self.book.has_unfinished():
                self._stuck()
        preemptions = sum(s.num_preemptions for s in self.book)
        metrics = Metrics.of(self.timings, self.trace, self.peak, self.sim.budget, preemptions)
        return SimResult(self.trace, sorted(self.timings, key=lambda t: t.seq_id), metrics,
                         self.jobs, self.durations, self.violations)

    def _stuck(self) -> None:
        stuck = self.book.unschedulable()
        if stuck is not None:
            raise SimulationError(f"request {stuck} (prompt {self.targets[stuck].prompt} tokens) "
                                  f"can never be scheduled: it does not fit the KV budget")
        pending = [j for i, j in enumerate(self.jobs) if not self.execution.plan_done(i)]
        raise SimulationError(f"deadlock at t={self.now:.6f}s: {len(pending)} unit(s) cannot "
                              f"progress and no event is pending")

    def _schedule(self) -> None:
        try:
            jobs = self.book.schedule()
        except SchedulingError as exc:
            raise SimulationError(str(exc)) from None
        for job in jobs:
            if self.on_plan is not None:
                self.on_plan(job)
            index = self.execution.add(job.plan)
            self.jobs.append(job)
            graph = job.plan.graph
            for node_id in range(len(graph.nodes)):
                if not graph.preds(node_id):
                    self.ready_at[(index, node_id)] = next(self.order)
            self.gates[index] = {(n.layer, n.device): n.id for n in graph.nodes
                                 if isinstance(n, Gate)}
            by_layer: dict[int, list[int]] = {}
            for (layer, _), gate in self.gates[index].items():
                by_layer.setdefault(layer, []).append(gate)
            self.layer_gates[index] = by_layer
            uses = [0] * len(graph.nodes)
            for edge in graph.edges:
                if edge.kind == "data":
                    uses[edge.src] += 1
            self.uses[index] = uses

    def _start_ready(self) -> None:
        while True:
            groups = self.execution.startable()
            if not groups:
                return
            for group in groups:
                stream = str(self.execution.stream_of(group[0]))
                self.execution.start(group)
                duration = self._duration(group)
                gid = next(self.seq)
                started = next(self.order)
                for task in group:
                    self.durations[task] = duration
                    node = self.jobs[task[0]].plan.graph.nodes[task[1]]
                    self.trace.append(TraceEvent(stream, node_label(node), type(node).__name__,
                                                 task[0], task[1], getattr(node, "layer", None),
                                                 self.now, self.now + duration, gid,
                                                 self.ready_at.pop(task, 0), started))
                    self._allocate(task, node)
                    self.push(self.now + duration, "finish", task)

    def _duration(self, group: tuple[Task, ...]) -> float:
        items = []
        for plan_index, node_id in group:
            graph = self.jobs[plan_index].plan.graph
            node = graph.nodes[node_id]
            if isinstance(node, Gate):
                self.counts[(plan_index, node_id)] = self.sim.routing.counts(
                    node.layer, node.num_tokens, node.device, graph.placement)
            items.append((graph, node, self._rows(plan_index, graph, node)))
        return self.sim.cost.group_duration(items)

    def _rows(self, plan_index: int, graph: Graph, node: Node) -> list[int]:
        """Rows per expert of the node's group (routed Expert and dispatch/combine only)."""
        if isinstance(node, Transfer) and node.payload in ("dispatch", "combine"):
            home = node.src if node.payload == "dispatch" else node.dst
            counts = self.counts[(plan_index, self.gates[plan_index][(node.layer, home)])]
            return [counts[e] for e in node.experts]
        if isinstance(node, Expert) and node.kind == "routed":
            total = [0] * len(node.experts)
            for gate in self.layer_gates[plan_index][node.layer]:
                drawn = self.counts.get((plan_index, gate))
                if drawn is None:
                    raise SimulationError(f"{node_label(node)} started before gate {gate} of "
                                          f"its layer ran: the plan breaks precedence")
                for j, e in enumerate(node.experts):
                    total[j] += drawn[e]
            return total
        return []

    def _output_bytes(self, plan_index: int, node: Node) -> tuple[str, float]:
        s, b = self.sim.model, self.sim.cost.b
        d = s.hidden_size
        if isinstance(node, Transfer):
            graph = self.jobs[plan_index].plan.graph
            return node.dst, sum(self._rows(plan_index, graph, node)) * d * b
        if isinstance(node, Expert) and node.kind == "routed":
            graph = self.jobs[plan_index].plan.graph
            return node.device, sum(self._rows(plan_index, graph, node)) * d * b
        tokens = getattr(node, "num_tokens", 0) or getattr(node, "num_rows", 0)
        if isinstance(node, LMHead):
            return node.device, node.num_rows * s.vocab_size * 4
        factor = 2 if isinstance(node, Attention) else 1
        if isinstance(node, Gate):
            factor = 1 + s.moe.top_k
        if isinstance(node, (Embed, Combine, Expert, Attention, Gate)):
            return node.device, factor * tokens * d * b
        return node.device, 0.0

    def _allocate(self, task: Task, node: Node) -> None:
        device, nbytes = self._output_bytes(task[0], node)
        if device not in self.activations:
            return
        self.live[task] = (device, nbytes)
        self.activations[device] += nbytes
        kv = self.book.kv_used.get(device, 0) * self.sim.kv_bytes_per_block
        total = self.sim.weights[device] + kv + self.activations[device]
        self.peak[device] = max(self.peak[device], total)
        if total > self.sim.budget[device] and len(self.violations) < 20:
            self.violations.append(
                f"t={self.now:.6f}s {device}: {total / 1e9:.3f} GB in use (weights "
                f"{self.sim.weights[device] / 1e9:.3f}, KV {kv / 1e9:.3f}, activations "
                f"{self.activations[device] / 1e9:.3f}) > budget "
                f"{self.sim.budget[device] / 1e9:.3f} GB")

    def _finish_node(self, task: Task) -> bool:
        """Returns whether a unit completed (so that scheduling may start more work)."""
        plan_index, node_id = task
        graph = self.jobs[plan_index].plan.graph
        node = graph.nodes[node_id]
        try:
            newly = self.execution.finish(task, self.counts.get(task))
        except SemanticsError as exc:
            raise SimulationError(str(exc)) from None
        for t in newly:
            self.ready_at[t] = next(self.order)
        for src in graph.inputs(node_id):
            self.uses[plan_index][src] -= 1
            if self.uses[plan_index][src] == 0:
                self._free((plan_index, src))
        if self.uses[plan_index][node_id] == 0:
            self._free(task)
        if self.execution.plan_done(plan_index):
            self._complete(self.jobs[plan_index])
            return True
        return False

    def _free(self, task: Task) -> None:
        held = self.live.pop(task, None)
        if held is not None:
            self.activations[held[0]] -= held[1]

    def _complete(self, job: Job) -> None:
        done = self.book.complete(job)
        self.idle_units = 0 if done.sampled else self.idle_units + 1
        if self.idle_units > self.idle_limit:
            raise SimulationError(
                f"no progress: {self.idle_units} units completed at t={self.now:.6f}s without "
                f"producing a token (a livelock: e.g. preemption undoing the work it makes "
                f"room for)")
        for seq_id in done.sampled:
            seq = self.book.add_output(seq_id)
            self.first.setdefault(seq_id, self.now)
            if seq.num_output >= self.targets[seq_id].output:
                self.book.finish(seq_id, "length")
                r = self.targets[seq_id]
                self.timings.append(RequestTiming(seq_id, r.arrival, self.first[seq_id],
                                                  self.now, r.prompt, r.output))
                if self.progress is not None:
                    self.progress(len(self.timings), len(self.requests))
