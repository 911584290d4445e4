"""The simulator's event loop: one run of `Simulator.run`.

Events are node finishes and request arrivals, in a heap by time (arrivals first at one
instant, then finishes in the order they were pushed). At each instant the loop finishes
what ends then, lets the book form and plan units if a unit completed or a request came,
and starts what every stream may start now (`Execution.start_startable`). Each unit in
flight is a `BoundUnit`: its plan's table, each node's duration and output bytes (bound
from the unit's sizes, or sized when a gate draws), and what its nodes' outputs hold.

What happens per event is a few list reads: every per-node figure is an array of the plan
(`PlanTable`) or of the unit, and each stream's busy time is a slot of a list.

Pure: no I/O (a sink may write), no clock of its own.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from moeflow.dataflow.graph import Expert, Node
from moeflow.scheduler.base import checked_adjustments, routes
from moeflow.scheduler.plan_cache import PlanCache
from moeflow.scheduler.requests import Job, RequestBook, SchedulingError
from moeflow.scheduler.semantics import Execution, SemanticsError
from moeflow.sim.cost import NodeCost, RowCosts
from moeflow.sim.replay import (
    GATE, RETURNED, STATIC, BoundUnit, PlanTable, TraceColumns, node_label,
)
from moeflow.sim.results import Metrics, RequestTiming, SimResult, SimulationError, TraceEvent
from moeflow.sim.workload import SimRequest

if TYPE_CHECKING:
    from moeflow.sim.simulator import Simulator

_ARRIVAL = (-1, -1)  # the task of a request's arrival in the event heap
TABLES_BEYOND_CACHE = 4  # tables kept for plans the plan cache no longer holds
SINK_BATCH = 1 << 13  # nodes handed to a trace sink at a time
Entry = tuple[float, int, tuple[int, int], Any]  # (time, order, task, its BoundUnit or None)


class TraceSink(Protocol):
    """Receives every node the simulator runs, as it starts it (the writers of
    `moeflow.sim.tracefile`)."""

    def prepare(self, resource: str, name: str, kind: str, node: int, layer: int | None
                ) -> Any:
        """What `add` gets for this node; called once per node of each plan a run meets."""

    def add(self, events: list[Any]) -> None:
        """Nodes that started since the last call, in the order they did, as flat (lane,
        job, start, end) quadruples: the lane `prepare` gave the node, the plan index of its
        unit, and its start and end in seconds. The list is the sink's to keep."""

    def close(self, result: SimResult) -> None:
        """The run is over: finish the output."""

    def abort(self) -> None:
        """The run failed: drop the output."""


class Run:
    def __init__(self, sim: Simulator, requests: Sequence[SimRequest],
                 progress: Callable[[int, int], None] | None,
                 on_plan: Callable[[Job], None] | None, record: bool,
                 sink: TraceSink | None,
                 token_progress: Callable[[int, int], None] | None = None) -> None:
        self.sim = sim
        self.requests = list(requests)
        self.progress = progress
        self.token_progress = token_progress
        self.tokens_done = 0
        self.tokens_total = sum(r.output for r in self.requests)
        self.on_plan = on_plan
        self.record = record
        self.sink = sink
        self.book = RequestBook(sim.scheduler, sim.model, sim.cluster, sim.kv_blocks,
                                sim.kv_block_size, max_batch_tokens=sim.max_batch_tokens,
                                max_seqs=sim.max_seqs,
                                plan_cache=PlanCache(sim.plan_cache) if sim.plan_cache else None)
        adjusted = routes(sim.scheduler)
        self.execution = Execution(on_routing=self._on_routing if adjusted else None)
        self.costs = RowCosts(sim.cost, adjusted)
        # layer -> kernel -> routed Expert groups it ran, as the scheduler's on_routing chose
        self.kernels: dict[int, dict[str, int]] = {}
        self.units: dict[int, BoundUnit] = {}  # plans in flight, by plan index
        self.tables: OrderedDict[int, PlanTable] = OrderedDict()  # id(plan) -> its table
        self.columns: dict[int, TraceColumns] = {}  # id(plan) -> how its nodes show
        self.sink_lanes: dict[int, list[Any]] = {}  # id(plan) -> the sink's, per node
        # nodes started that the sink has not been handed yet (see TraceSink.add)
        self.to_sink: list[Any] | None = None if sink is None else []
        self.heap: list[Entry] = []  # node finishes and arrivals
        self.seq = itertools.count()
        self.now = 0.0
        self.devices = sim.placement.devices
        self.activations = [0.0] * len(self.devices)
        self.peak = [sim.weights[d] for d in self.devices]
        self.budget = [sim.budget[d] for d in self.devices]
        self.base = [0.0] * len(self.devices)  # weights + KV, as of the book's last change
        self.violations: list[str] = []
        self.resources: dict[str, int] = {}  # "actor/stream" -> its number, as tables meet it
        self.busy: list[float] = []  # seconds, by stream number
        self.ran: list[bool] = []  # by stream number: some plan added has nodes on it
        self.num_events = 0
        self.num_units = 0
        # recorded only
        self.trace: list[TraceEvent] = []
        self.jobs: list[Job] = []
        self.durations: dict[tuple[int, int], float] = {}
        self.order = itertools.count()
        self.ready_at: dict[tuple[int, int], int] = {}
        # livelock guard: units completed since a token was last produced. Every unit
        # moves some sequence forward, so a healthy run cannot need more than a few times
        # the workload's tokens between two tokens, even with recomputation
        self.idle_units = 0
        self.idle_limit = 4 * sum(r.prompt + r.output for r in self.requests) + 1000
        self.first: dict[int, float] = {}
        self.timings: list[RequestTiming] = []
        self._rebase()

    def go(self) -> SimResult:
        self._loop()
        if self.sink is not None and self.to_sink:
            self.sink.add(self.to_sink)
            self.to_sink = []
        preemptions = sum(s.num_preemptions for s in self.book)
        peak_by_device = dict(zip(self.devices, self.peak))
        busy = {r: self.busy[i] for r, i in self.resources.items() if self.ran[i]}
        metrics = Metrics.of(self.timings, busy, peak_by_device, self.sim.budget, preemptions)
        return SimResult(self.trace, sorted(self.timings, key=lambda t: t.seq_id), metrics,
                         self.jobs, self.durations, self.violations, self.num_events,
                         self.num_units, self.kernels)

    def _loop(self) -> None:
        heap, book, execution, units = self.heap, self.book, self.execution, self.units
        # arrivals go first, in request order, then finishes in the order they were pushed
        heap.extend((r.arrival, i, _ARRIVAL, None) for i, r in enumerate(self.requests))
        heapq.heapify(heap)
        self.seq = seq = itertools.count(len(heap))
        pop, push, record, sink = heapq.heappop, heapq.heappush, self.record, self.sink
        to_sink = self.to_sink
        finish, start_startable = execution.finish, execution.start_startable
        act, base, peak, busy = self.activations, self.base, self.peak, self.busy
        budget = self.budget
        num_events = 0  # started alone; _start_group counts its own
        while heap:
            self.now = now = heap[0][0]
            changed = False
            while heap and heap[0][0] == now:  # everything that ends now, then what starts
                _, i, task, u = pop(heap)
                if u is None:  # an arrival
                    r = self.requests[i]
                    book.add(i, r.prompt, r.output, now)
                    changed = True
                    continue
                node_id = task[1]
                try:
                    newly = finish(task, u.counts.get(node_id))  # a gate's rows, if it is one
                except SemanticsError as exc:
                    raise SimulationError(str(exc)) from None
                if record:
                    for t in newly:
                        self.ready_at[t] = next(self.order)
                uses, held, table = u.uses, u.held, u.table
                for src in table.inputs[node_id]:  # outputs no one needs any more
                    left = uses[src] - 1
                    uses[src] = left
                    if not left and held[src] is not None:
                        act[table.out_dev[src]] -= held[src]
                        held[src] = None
                if not uses[node_id] and held[node_id] is not None:
                    act[table.out_dev[node_id]] -= held[node_id]
                    held[node_id] = None
                u.left -= 1
                if not u.left:  # the plan is done
                    self._complete(task[0])
                    changed = True
            if changed:
                self._schedule()
                base = self.base
            for group in start_startable():
                if len(group) > 1 or record:
                    self._start_group(group)
                    continue
                task = group[0]
                node_id = task[1]
                u = units[task[0]]
                duration = u.dur[node_id]
                if duration is None:  # a gate draws its rows as it starts
                    duration = self._late(u, task)
                end = now + duration
                table = u.table
                rid = table.rid[node_id]
                busy[rid] = busy[rid] + end - now  # as busy_of adds
                if to_sink is not None:
                    to_sink += (u.lanes[node_id], task[0], now, end)  # type: ignore[index]
                dev = table.out_dev[node_id]
                if dev >= 0:  # its output is held until its last consumer finishes
                    nbytes = u.held[node_id] = u.nbytes[node_id]
                    act[dev] += nbytes
                    total = base[dev] + act[dev]
                    if total > peak[dev]:
                        peak[dev] = total
                    if total > budget[dev] and len(self.violations) < 20:
                        self._violation(dev, total)
                push(heap, (end, next(seq), task, u))
                num_events += 1
            if to_sink is not None and len(to_sink) >= 4 * SINK_BATCH:
                sink.add(to_sink)  # type: ignore[union-attr]
                self.to_sink = to_sink = []
            if not heap and book.has_unfinished():
                self._stuck()
        self.num_events += num_events

    def _stuck(self) -> None:
        stuck = self.book.unschedulable()
        if stuck is not None:
            raise SimulationError(f"request {stuck} (prompt {self.requests[stuck].prompt} "
                                  f"tokens) can never be scheduled: it does not fit the KV budget")
        raise SimulationError(f"deadlock at t={self.now:.6f}s: {len(self.units)} unit(s) cannot "
                              f"progress and no event is pending")

    def _rebase(self) -> None:
        """Weights plus KV per device, after the book changed its KV ledger."""
        per_block = self.sim.kv_bytes_per_block
        kv = self._kv_blocks()
        self.base = [self.sim.weights[d] + kv.get(d, 0) * per_block for d in self.devices]

    def _kv_blocks(self) -> dict[str, int]:
        """KV blocks in use per device that holds them (the book keeps them by home)."""
        where = self.sim.kv_device
        out: dict[str, int] = {}
        for home, used in self.book.kv_used.items():
            device = where.get(home, home)
            out[device] = out.get(device, 0) + used
        return out

    # -- units ---------------------------------------------------------------------

    def _schedule(self) -> None:
        try:
            jobs = self.book.schedule()
        except SchedulingError as exc:
            raise SimulationError(str(exc)) from None
        if self.book.kv_full:  # the engine would end it at its KV's end; a simulated
            # workload asks for its lengths whole
            seq = self.book.seqs[self.book.kv_full[0]]
            raise SimulationError(
                f"request {seq.seq_id} (prompt {seq.num_prompt}, output {seq.max_new_tokens} "
                f"tokens) outgrew the KV cache of its device alone ({self.book.kv_tokens:,} "
                f"tokens): shorten the lengths or use devices with more memory")
        self._rebase()
        for job in jobs:
            table = self._table(job.plan)
            if job.plan.graph.unit != job.unit and not table.rebindable:
                # sizes this plan's nodes do not derive from its unit: plan this unit anew
                job = dataclasses.replace(job, plan=self.sim.scheduler.plan(
                    job.unit, self.sim.model, self.sim.cluster), plan_id=None)
                table = self._table(job.plan)
            if self.on_plan is not None:
                self.on_plan(job)
            index = self.execution.add(job.plan)
            u = self.units[index] = BoundUnit.of(job, table, self.costs, self._lanes(table))
            for rid in table.stream_ids:
                self.ran[rid] = True
            self.num_units += 1
            if self.record:
                u.shown = self._columns(table)
                self.jobs.append(job)
                for node_id in table.roots:
                    self.ready_at[(index, node_id)] = next(self.order)
        if self.book.plan_cache is not None:
            self.book.plan_cache.take_evicted()

    def _table(self, plan: Any) -> PlanTable:
        table = self.tables.get(id(plan))
        if table is None:
            table = self.tables[id(plan)] = PlanTable.of(plan, self.devices, self.resources)
            grown = len(self.resources) - len(self.busy)
            self.busy += [0.0] * grown
            self.ran += [False] * grown
            if len(self.tables) > self.sim.plan_cache + TABLES_BEYOND_CACHE:
                _, old = self.tables.popitem(last=False)
                self.columns.pop(id(old.plan), None)
                self.sink_lanes.pop(id(old.plan), None)
        else:
            self.tables.move_to_end(id(plan))
        return table

    def _lanes(self, table: PlanTable) -> list[Any] | None:
        """The sink's per node of the table's plan."""
        if self.sink is None:
            return None
        lanes = self.sink_lanes.get(id(table.plan))
        if lanes is None:
            shown = self._columns(table)
            lanes = self.sink_lanes[id(table.plan)] = list(map(
                self.sink.prepare, table.resource, shown.name, shown.kind,
                range(len(shown.name)), shown.layer))
        return lanes

    def _columns(self, table: PlanTable) -> TraceColumns:
        columns = self.columns.get(id(table.plan))
        if columns is None:
            columns = self.columns[id(table.plan)] = TraceColumns.of(table.plan)
        return columns

    def _complete(self, index: int) -> None:
        u = self.units.pop(index)
        self.execution.release(index)
        done = self.book.complete(u.job)
        self.idle_units = 0 if done.sampled else self.idle_units + 1
        if self.idle_units > self.idle_limit:
            raise SimulationError(
                f"no progress: {self.idle_units} units completed at t={self.now:.6f}s without "
                f"producing a token (a livelock: e.g. preemption undoing the work it makes "
                f"room for)")
        for seq_id in done.sampled:
            seq = self.book.add_output(seq_id)
            self.first.setdefault(seq_id, self.now)
            r = self.requests[seq_id]
            if seq.num_output >= r.output:
                self.book.finish(seq_id, "length")
                self.timings.append(RequestTiming(seq_id, r.arrival, self.first.pop(seq_id),
                                                  self.now, r.prompt, r.output))
                if self.progress is not None:
                    self.progress(len(self.timings), len(self.requests))
        if done.sampled and self.token_progress is not None:
            self.tokens_done += len(done.sampled)
            self.token_progress(self.tokens_done, self.tokens_total)
        self._rebase()

    # -- nodes ---------------------------------------------------------------------

    def _start_group(self, group: tuple[tuple[int, int], ...]) -> None:
        """Start a coalesced group (one kernel, each member's output held on its own), or
        any group while the run records."""
        gid = next(self.seq)
        started = next(self.order) if self.record else 0
        if len(group) == 1:
            index, node_id = group[0]
            u = self.units[index]
            duration = u.dur[node_id]
            if duration is None:
                duration = self._late(u, group[0])
            sizes = [u.nbytes[node_id]]
        else:
            duration, sizes = self._group_duration(group)
        now = self.now
        end = now + duration
        table = self.units[group[0][0]].table
        rid = table.rid[group[0][1]]
        self.busy[rid] = self.busy[rid] + end - now  # once per kernel
        act, base, peak = self.activations, self.base, self.peak
        for task, nbytes in zip(group, sizes):
            index, node_id = task
            u = self.units[index]
            if self.record:
                self._record(task, u, duration, gid, started)
            if self.to_sink is not None:
                self.to_sink += (u.lanes[node_id], index, now, end)  # type: ignore[index]
            dev = u.table.out_dev[node_id]
            if dev >= 0:
                u.held[node_id] = nbytes
                act[dev] += nbytes
                total = base[dev] + act[dev]
                if total > peak[dev]:
                    peak[dev] = total
                if total > self.budget[dev] and len(self.violations) < 20:
                    self._violation(dev, total)
            heapq.heappush(self.heap, (end, next(self.seq), task, u))
        self.num_events += len(group)

    def _late(self, u: BoundUnit, task: tuple[int, int]) -> float:
        """The duration of a node its unit could not size when bound: a gate draws its rows
        as it starts; a combine is sized by its homes' gates, which have all drawn when its
        experts ran; a routed Expert whose kernel the scheduler picks is sized on it as it
        starts; a node sized by a gate that has not drawn breaks precedence."""
        node_id = task[1]
        code = u.table.code[node_id]
        if code == GATE:
            return u.draw(node_id, self.sim.routing)
        if code == RETURNED:
            num_rows = u.returned(node_id)
            if num_rows is None:
                raise SimulationError(f"{node_label(u.nodes[node_id])} started before the "
                                      f"gates of its homes ran: the plan breaks precedence")
            u.nbytes[node_id] = num_rows * self.costs.row_bytes
            duration = u.dur[node_id] = self.costs.moved(u.graph, u.nodes[node_id],  # type: ignore[arg-type]
                                                         num_rows)
            return duration
        rows = self._rows(u, node_id)  # raises if its gate has not drawn
        node = u.nodes[node_id]
        if self.costs.adjusted and isinstance(node, Expert) and node.kind == "routed":
            return self.costs.routed(u.graph, node, rows, self._kernel(task, node))
        raise AssertionError(f"node {node_id} was not sized when its gate drew")

    def _kernel(self, task: tuple[int, int], node: Expert) -> str | None:
        kernel = self.execution.kernel(task)
        if kernel is not None:
            chosen = self.kernels.setdefault(node.layer, {})
            chosen[kernel] = chosen.get(kernel, 0) + 1
        return kernel

    def _on_routing(self, index: int, layer: int, counts: tuple[int, ...],
                    groups: tuple[tuple[int, ...], ...]) -> dict[tuple[int, ...], str] | None:
        return checked_adjustments(self.sim.scheduler.on_routing(
            self.units[index].job.unit, layer, counts, groups), groups)

    def _group_duration(self, group: tuple[tuple[int, int], ...]
                        ) -> tuple[float, list[float]]:
        """The duration of a coalesced group, and each member's output bytes."""
        cost = self.sim.cost
        members: list[tuple[Node, NodeCost | None, Sequence[int]]] = []
        for index, node_id in group:
            u = self.units[index]
            code = u.table.code[node_id]
            if code == GATE:
                u.draw(node_id, self.sim.routing)
            if code in (STATIC, GATE):
                members.append((*u.bound[u.table.slot[node_id]], ()))
            else:
                members.append((u.nodes[node_id], None, self._rows(u, node_id)))
        first, graph = members[0][0], self.units[group[0][0]].graph
        if isinstance(first, Expert) and first.kind == "routed":
            kernel = self._kernel(group[0], first) if self.costs.adjusted else None
            c = cost.merge(graph, first, [], [rows for _, _, rows in members], kernel)
        else:
            c = cost.merge(graph, first, [m if m is not None else cost.cost(graph, node, rows)
                                          for node, m, rows in members], [])
        sizes = []
        for (index, node_id), (_, m, rows) in zip(group, members):
            u = self.units[index]
            sizes.append(u.static[u.table.slot[node_id]][1] if m is not None
                         else sum(rows) * self.costs.row_bytes)
        return cost.time_of(first, c), sizes

    def _rows(self, u: BoundUnit, node_id: int) -> tuple[int, ...]:
        rows = u.rows(node_id)
        if rows is None:
            gate = next(g for g in u.table.gates[node_id] if g not in u.counts)
            raise SimulationError(f"{node_label(u.nodes[node_id])} started before gate {gate} "
                                  f"of its layer ran: the plan breaks precedence")
        return rows

    def _record(self, task: tuple[int, int], u: BoundUnit, duration: float, gid: int,
                started: int) -> None:
        c, node_id = u.shown, task[1]
        assert c is not None  # set when the unit was bound, as the run records
        self.durations[task] = duration
        self.trace.append(TraceEvent(u.table.resource[node_id], c.name[node_id],
                                     c.kind[node_id], task[0], node_id, c.layer[node_id],
                                     self.now, self.now + duration, gid,
                                     self.ready_at.pop(task, 0), started))

    def _violation(self, dev: int, total: float) -> None:
        device = self.devices[dev]
        weights = self.sim.weights[device]
        kv = self._kv_blocks().get(device, 0) * self.sim.kv_bytes_per_block
        self.violations.append(
            f"t={self.now:.6f}s {device}: {total / 1e9:.3f} GB in use (weights "
            f"{weights / 1e9:.3f}, KV {kv / 1e9:.3f}, activations "
            f"{self.activations[dev] / 1e9:.3f}) > budget {self.budget[dev] / 1e9:.3f} GB")
