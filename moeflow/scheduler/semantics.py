"""The one execution semantics of moeflow, shared by every executor.

    - each stream runs one node (or one coalesced group) at a time;
    - a node is ready when all its predecessors are done;
    - a stream picks its next node by its rule (InOrder: the next in its sequence, once
      ready; ByPriority: the ready node with the smallest key (on a fifo stream, ties go
      to the node ready first), joined on a coalescing stream by the other ready nodes
      with its merge key, save any that a ready node left out ranks before: joining
      never lets a node pass one with a smaller key);
    - a Gate's completion carries the per-expert row counts of its layer;
    - a plan's routed Experts that read the rows of the same gates form one routing (all
      of a layer's, unless the plan cuts the layer's tokens into micro-batches, each with
      its own gate): when the first of them this Execution runs becomes ready, all those
      gates have finished, and `on_routing(plan index, layer, counts, groups)` is called
      once for it, with their summed counts and its Experts' groups. What it returns,
      {expert group: kernel}, adjusts those Experts (`kernel(task)`). Every executor
      reaches this point at the same event, so the choice never depends on which executor
      runs a plan.

`Execution` holds this state for any number of Plans at once (units in flight together share
streams: fine-grained EP overlaps inputs on one actor). It knows nothing of time or tensors:
the in-process executor runs each started node right away, the simulator advances a clock
from a cost model, and the actors run nodes on real streams. All of them take what may
start from `startable` (or `next_node`/`next_group`) and report back through `start`,
`finish` and `finish_external`, so they cannot disagree on what may run when.

Tasks are named (plan index, node id). Plan indices are never reused; `release` lets go of
a finished plan, so the state held grows with the plans in flight, not with time.

An actor runs the same semantics over whole plans but owns only its own streams: `add(plan,
owns=...)` leaves other actors' nodes out of every stream, and `finish_external(task)`
marks one of them done when its data or a notice arrives. A plan is done for such an
Execution when all the nodes it owns are.

The state is integer arrays over the plan's compact form (`_Shape`, built once per Plan
object and shared by every add of it): per node, its unfinished predecessors (-1 once done),
and per stream, its InOrder sequence as runs of one plan's order each, or its ByPriority
heap of ready nodes. Adding a plan copies two arrays; it makes no object per node.
"""

from __future__ import annotations

import heapq
import itertools
import operator
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from moeflow.dataflow.graph import Expert, Gate, Transfer
from moeflow.scheduler.plan import ByPriority, InOrder, Plan, PriorityKey, Rule, Stream

Task = tuple[int, int]
Group = tuple[Task, ...]
# {expert group (a routed Expert's `experts`): kernel}: what `on_routing` returns
Adjustments = dict[tuple[int, ...], str]
# (plan index, layer, counts, the routing's expert groups) -> adjustments
OnRouting = Callable[[int, int, tuple[int, ...], tuple[tuple[int, ...], ...]],
                     "Adjustments | None"]
KEEP_RELEASED = 8  # the arrays of this many released plans are kept for their replay
DONE = -1  # `waiting` of a finished node
_FIELDS = operator.attrgetter("actor", "name")  # a Stream's


class SemanticsError(RuntimeError):
    """A caller broke the semantics: started a node that is not ready or not its stream's
    turn, or started two on one stream."""


def _not_running(task: Task) -> SemanticsError:
    return SemanticsError(f"task {task} finished but its stream is not running it")


@dataclass(eq=False, slots=True)
class _Run:
    """One plan's part of an InOrder stream's sequence: `order[pos:]` is still to start."""

    index: int
    order: tuple[int, ...]
    waiting: list[int]  # the plan's, by node: its head may start when it reaches 0
    pos: int = 0


@dataclass(eq=False, slots=True)
class _StreamState:
    stream: Stream
    rule_kind: type
    coalesce: bool = False
    fifo: bool = False
    running: set[Task] = field(default_factory=set)
    users: int = 0  # plans held that have nodes on it: with none, it may take another rule
    queue: deque[_Run] = field(default_factory=deque)  # InOrder: issue sequence
    # ByPriority: (key, when it became ready on a fifo stream else 0, plan, node)
    heap: list[tuple[PriorityKey, int, int, int]] = field(default_factory=list)


@dataclass(eq=False, slots=True)
class _PlanState:
    plan: Plan
    waiting: list[int]  # unfinished predecessors per node; DONE once it finished
    streams: list[_StreamState | None]  # per node; None: another actor's node
    succs: tuple[tuple[int, ...], ...]  # the graph's, per node
    used: tuple[_StreamState, ...]  # the streams it has nodes on, each once
    shape: _Shape
    num_owned: int = 0
    num_done: int = 0
    gate_counts: dict[int, tuple[int, ...]] = field(default_factory=dict)  # gate -> rows
    kernels: dict[int, Adjustments] = field(default_factory=dict)  # routing -> on_routing's


@dataclass(frozen=True, slots=True)
class _Routing:
    """Routed Experts of a plan that read the rows of the same gates."""

    layer: int
    gates: tuple[int, ...]
    groups: tuple[tuple[int, ...], ...]  # their expert groups


@dataclass(eq=False, slots=True)
class _Shape:
    """A plan's structure as arrays, built once and shared by every add of the same Plan
    object (a plan cache replays one object), while some plan that uses it is held."""

    plan: Plan
    indegree: tuple[int, ...]
    succs: tuple[tuple[int, ...], ...]
    rule_index: tuple[int, ...]  # per node: its stream's position in plan.rules
    roots: tuple[int, ...]  # nodes without predecessors
    # per node: the gate whose rows finishing it makes known (a Gate: itself; a dispatch
    # Transfer, which another actor hears of with its gate's counts: that gate), else -1
    counted_gate: tuple[int, ...]
    routing_of: tuple[int, ...]  # per node: its routing if it is a routed Expert, else -1
    routings: tuple[_Routing, ...]
    users: int = 0

    @staticmethod
    def of(plan: Plan) -> _Shape:
        graph = plan.graph
        indegree = [0] * len(graph.nodes)
        succs: list[list[int]] = [[] for _ in graph.nodes]
        for edge in graph.edges:  # one pass, in the order graph.succs lists them
            indegree[edge.dst] += 1
            succs[edge.src].append(edge.dst)
        # streams by their fields: equal streams have equal fields, and a tuple of two
        # strings hashes in C where a Stream's dataclass hash runs Python
        position = {(stream.actor, stream.name): i for i, (stream, _) in enumerate(plan.rules)}
        counted_gate = [-1] * len(graph.nodes)
        routing_of = [-1] * len(graph.nodes)
        # the gates an Expert reads, directly or through a dispatch -> (routing, layer, groups)
        by_gates: dict[tuple[int, ...], tuple[int, int, dict[tuple[int, ...], None]]] = {}
        for node in graph.nodes:
            if type(node) is Gate:
                counted_gate[node.id] = node.id
            elif type(node) is Transfer and node.payload == "dispatch":
                counted_gate[node.id] = next(
                    (p for p in graph.inputs(node.id) if type(graph.nodes[p]) is Gate), -1)
            elif type(node) is Expert and node.kind == "routed":
                gates = graph.gates_read(node.id)
                index, _, groups = by_gates.setdefault(gates, (len(by_gates), node.layer, {}))
                groups[node.experts] = None
                routing_of[node.id] = index
        routings = tuple(_Routing(layer, gates, tuple(groups))
                         for gates, (_, layer, groups) in by_gates.items())
        return _Shape(plan, tuple(indegree), tuple(map(tuple, succs)),
                      tuple(map(position.__getitem__, map(_FIELDS, plan.assignment))),
                      tuple(itertools.compress(itertools.count(), map(operator.not_, indegree))),
                      tuple(counted_gate), tuple(routing_of), routings)


class Execution:
    def __init__(self, plans: Iterable[Plan] = (), on_routing: OnRouting | None = None
                 ) -> None:
        self.on_routing = on_routing  # see the module docstring; None: never adjusted
        self.plans: dict[int, _PlanState] = {}  # plans held: added and not yet released
        self._indices = itertools.count()
        self.streams: dict[Stream, _StreamState] = {}
        # streams whose next node may have changed, keyed by their state: its identity hash
        # is far cheaper than a Stream's, and this is touched at every event
        self._touched: dict[_StreamState, None] = {}
        self._spare: dict[_StreamState, None] | None = {}  # the next _touched, empty
        self._shapes: dict[int, _Shape] = {}  # id(plan) -> its arrays, while a plan uses it
        # and for the last few released: a replayed plan comes back soon after its release
        self._released: OrderedDict[int, _Shape] = OrderedDict()
        # the order nodes become ready, for fifo streams: one number per event (an add or a
        # finish) that readies some node of one, so nodes ready at once tie
        self._arrivals = itertools.count()
        for plan in plans:
            self.add(plan)

    # -- building ------------------------------------------------------------------

    def add(self, plan: Plan, owns: Callable[[Stream], bool] | None = None) -> int:
        """Admit a plan; its nodes join their streams after those already there. With
        `owns`, only streams it accepts run here; the rest are finished externally."""
        kinds: list[tuple[Stream, Rule, bool, bool] | None] = []
        unused: list[Stream] = []  # streams no plan held uses, to take this plan's rule
        for stream, rule in plan.rules:  # check every rule before changing anything
            if owns is not None and not owns(stream):
                kinds.append(None)
                continue
            coalesce = fifo = False
            if type(rule) is ByPriority:
                coalesce, fifo = rule.coalesce, rule.fifo
            state = self.streams.get(stream)
            if state is not None and (state.rule_kind is not type(rule)
                                      or state.coalesce != coalesce or state.fifo != fifo):
                if state.users:
                    raise SemanticsError(f"stream {stream} follows {state.rule_kind.__name__} "
                                         f"in one plan and {rule!r} in another")
                unused.append(stream)
            kinds.append((stream, rule, coalesce, fifo))
        for stream in unused:
            del self.streams[stream]
        index = next(self._indices)
        shape = self._shapes.get(id(plan)) or self._released.pop(id(plan), None)
        if shape is None:
            shape = _Shape.of(plan)
        self._shapes[id(plan)] = shape
        shape.users += 1
        waiting = list(shape.indegree)
        by_rule: list[_StreamState | None] = []
        for kind in kinds:
            if kind is None:
                by_rule.append(None)
                continue
            stream, rule, coalesce, fifo = kind
            state = self.streams.get(stream)
            if state is None:
                state = self.streams[stream] = _StreamState(stream, type(rule), coalesce, fifo)
            if type(rule) is InOrder:
                state.queue.append(_Run(index, rule.order, waiting))
            state.users += 1
            self._touched[state] = None
            by_rule.append(state)
        streams = list(map(by_rule.__getitem__, shape.rule_index))
        p = self.plans[index] = _PlanState(plan, waiting, streams, shape.succs,
                                           tuple(s for s in by_rule if s is not None),
                                           shape,
                                           len(streams) - streams.count(None))
        arrival = -1
        for node_id in shape.roots:
            state = streams[node_id]
            if state is not None and state.rule_kind is ByPriority:
                if arrival < 0:
                    arrival = next(self._arrivals)
                heapq.heappush(state.heap, (p.plan.priority[node_id],
                                            arrival if state.fifo else 0, index, node_id))
        return index

    # -- queries -------------------------------------------------------------------

    def rule_of(self, task: Task) -> Rule:
        plan = self.plans[task[0]].plan
        return plan.rule(plan.assignment[task[1]])

    def stream_of(self, task: Task) -> Stream:
        return self.plans[task[0]].plan.assignment[task[1]]

    def next_node(self, stream: Stream) -> Task | None:
        """The task `stream` would start now, or None (busy, or nothing it may run)."""
        return self._next(self.streams[stream])

    @staticmethod
    def _next(state: _StreamState) -> Task | None:
        if state.running:
            return None
        if state.rule_kind is InOrder:
            if state.queue:
                run = state.queue[0]
                node_id = run.order[run.pos]
                if run.waiting[node_id] == 0:
                    return (run.index, node_id)
            return None
        return (state.heap[0][2], state.heap[0][3]) if state.heap else None

    def is_ready(self, task: Task) -> bool:
        """All of `task`'s predecessors are done and it has not started (it runs here)."""
        p = self.plans.get(task[0])
        if p is None or p.waiting[task[1]] != 0:
            return False
        state = p.streams[task[1]]
        return state is not None and task not in state.running

    def idle_streams(self) -> Iterator[Stream]:
        return (s for s, st in self.streams.items() if not st.running)

    def next_group(self, stream: Stream) -> Group | None:
        return self._group(self.streams[stream])

    def _group(self, state: _StreamState) -> Group | None:
        head = self._next(state)
        if head is None:
            return None
        if not state.coalesce:
            return (head,)
        key = self.plans[head[0]].plan.merge[head[1]]
        if key is None:
            return (head,)
        plans = self.plans
        mates = []
        first_left = None  # the smallest key of the ready nodes left out of the group
        for h in state.heap:
            if (h[2], h[3]) == head:
                continue
            if plans[h[2]].plan.merge[h[3]] == key:
                mates.append(h)
            elif first_left is None or h[0] < first_left:
                first_left = h[0]
        if first_left is not None:  # joining never lets a node pass one that ranks before it
            mates = [h for h in mates if not first_left < h[0]]
        mates.sort()
        return (head, *((p, n) for _, _, p, n in mates))

    def startable(self) -> list[Group]:
        """The group every stream would start now (one per stream), checking only streams
        whose state changed since the last call. Start them, or call again later."""
        out = []
        touched, self._touched = self._touched, {}
        for state in touched:
            group = self._group(state)
            if group is not None:
                out.append(group)
        return out

    def start_startable(self) -> list[Group]:
        """Start every group `startable` would return, and return them: the same as starting
        each of those, without checking again what was just chosen."""
        out: list[Group] = []
        spare = self._spare
        touched, self._touched = self._touched, {} if spare is None else spare
        self._spare = None  # until touched is cleared (an error leaves it to the collector)
        for state in touched:
            if state.running:
                continue
            if state.rule_kind is InOrder:  # _group and _start for one InOrder node, inlined:
                queue = state.queue  # the hot path of every executor
                if queue:
                    run = queue[0]
                    pos = run.pos
                    order = run.order
                    node_id = order[pos]
                    if run.waiting[node_id] == 0:
                        head = (run.index, node_id)
                        pos += 1
                        if pos == len(order):
                            queue.popleft()
                        run.pos = pos
                        state.running.add(head)  # it was idle: empty
                        out.append((head,))
                continue
            group = self._group(state)
            if group is not None:
                self._start(state, group)
                out.append(group)
        touched.clear()
        self._spare = touched
        return out

    @property
    def done(self) -> bool:
        return all(p.num_done == p.num_owned for p in self.plans.values())

    def plan_done(self, index: int) -> bool:
        p = self.plans[index]
        return p.num_done == p.num_owned

    def owns(self, task: Task) -> bool:
        return self.plans[task[0]].streams[task[1]] is not None

    def counts(self, plan_index: int, layer: int) -> tuple[int, ...] | None:
        """Per-expert row counts of `layer` once a Gate of that layer has finished (summed
        over the plan's gates that have, here or, through their dispatches, elsewhere)."""
        p = self.plans[plan_index]
        known = [c for gate, c in p.gate_counts.items()
                 if p.plan.graph.nodes[gate].layer == layer]  # type: ignore[union-attr]
        return tuple(map(sum, zip(*known))) if known else None

    def kernel(self, task: Task) -> str | None:
        """The kernel `on_routing` chose for a routed Expert, or None (the executor's own
        choice): a routing is adjusted once one of its Experts is ready."""
        p = self.plans[task[0]]
        routing = p.shape.routing_of[task[1]]
        if routing < 0:
            return None
        chosen = p.kernels.get(routing)
        if not chosen:
            return None
        return chosen.get(p.plan.graph.nodes[task[1]].experts)  # type: ignore[union-attr]

    def adjustments(self, plan_index: int) -> dict[int, Adjustments]:
        """Each layer's adjustments so far, as `on_routing` returned them (merged over the
        layer's routings)."""
        p = self.plans[plan_index]
        out: dict[int, Adjustments] = {}
        for routing, chosen in p.kernels.items():
            out.setdefault(p.shape.routings[routing].layer, {}).update(chosen)
        return out

    def busy(self, stream: Stream) -> Task | None:
        """The node a stream is running (the smallest task of its group), or None."""
        running = self.streams[stream].running
        return min(running) if running else None

    # -- transitions ---------------------------------------------------------------

    def start(self, task: Task | Group) -> None:
        """Start a stream's next node, or a group of them: the stream's next node and any
        of the ready nodes that may join it (see `next_group`)."""
        group: Group = (task,) if isinstance(task[0], int) else task
        head = group[0]
        state = self.plans[head[0]].streams[head[1]]
        if state is None:
            raise SemanticsError(f"task {head} belongs to another actor")
        allowed = self._group(state)
        if allowed is None or head != allowed[0] or not set(group) <= set(allowed):
            raise SemanticsError(f"{group} on {state.stream} is not what the stream may start "
                                 f"now (it may start {allowed}; running {state.running})")
        self._start(state, group)

    @staticmethod
    def _start(state: _StreamState, group: Group) -> None:
        if state.rule_kind is InOrder:
            run = state.queue[0]
            run.pos += 1
            if run.pos == len(run.order):
                state.queue.popleft()
        elif len(group) == 1:  # the head is the heap's top
            heapq.heappop(state.heap)
        else:
            members = set(group)
            state.heap = [h for h in state.heap if (h[2], h[3]) not in members]
            heapq.heapify(state.heap)
        state.running = set(group)

    def finish(self, task: Task, counts: tuple[int, ...] | None = None) -> list[Task]:
        """Mark `task` done; `counts` are its per-expert rows if it is a Gate. Returns the
        tasks that became ready."""
        p = self.plans[task[0]]
        state = p.streams[task[1]]
        if state is None:  # another actor's node
            raise _not_running(task)
        running = state.running
        try:
            running.remove(task)
        except KeyError:
            raise _not_running(task) from None
        if not running:
            self._touched[state] = None
        p.num_done += 1
        return self._complete(task, counts, p)

    def finish_external(self, task: Task, counts: tuple[int, ...] | None = None) -> list[Task]:
        """Another actor's node is done (its data or a notice arrived); `counts` are its
        gate's per-expert rows if it is a Gate or a dispatch from one (each gate's rows are
        counted once, however many of its dispatches bring them)."""
        if self.owns(task):
            raise SemanticsError(f"task {task} runs here; it cannot finish externally")
        p = self.plans[task[0]]
        if p.waiting[task[1]] == DONE:
            raise SemanticsError(f"task {task} finished twice (or its plan was forgotten)")
        return self._complete(task, counts, p)

    def _complete(self, task: Task, counts: tuple[int, ...] | None, p: _PlanState
                  ) -> list[Task]:
        plan_index, node_id = task
        waiting, streams = p.waiting, p.streams
        waiting[node_id] = DONE
        if counts is not None:
            gate = p.shape.counted_gate[node_id]
            if gate >= 0 and gate not in p.gate_counts:
                p.gate_counts[gate] = counts
        newly: list[Task] = []
        touched = self._touched
        arrival = -1
        routing_of = None if self.on_routing is None else p.shape.routing_of
        adjust: list[int] | None = None  # routings whose first Expert became ready here
        for succ in p.succs[node_id]:
            left = waiting[succ] - 1
            waiting[succ] = left
            if not left:
                newly.append((plan_index, succ))
                state = streams[succ]
                if state is None:  # another actor's node: it finishes externally
                    continue
                if routing_of is not None and routing_of[succ] >= 0:
                    adjust = [*(adjust or ()), routing_of[succ]]
                if state.rule_kind is ByPriority:
                    if arrival < 0:
                        arrival = next(self._arrivals)
                    heapq.heappush(state.heap, (p.plan.priority[succ],
                                                arrival if state.fifo else 0, plan_index, succ))
                touched[state] = None
        if adjust is not None:  # last: on_routing may raise, and the state is whole
            for routing in adjust:
                if routing not in p.kernels:
                    self._adjust(plan_index, p, routing)
        return newly

    def _adjust(self, plan_index: int, p: _PlanState, index: int) -> None:
        p.kernels[index] = {}  # asked once, even if it raises
        routing = p.shape.routings[index]
        known = [p.gate_counts[g] for g in routing.gates if g in p.gate_counts]
        if not known:  # an executor that reports no counts
            return
        counts = known[0] if len(known) == 1 else tuple(map(sum, zip(*known)))
        chosen = self.on_routing(plan_index, routing.layer, counts,  # type: ignore[misc]
                                 routing.groups)
        if chosen:
            p.kernels[index] = dict(chosen)

    def run_in_order(self, streams: Iterable[Stream] | None = None) -> Iterator[Task]:
        """Drive every plan to completion one task at a time, for an executor whose every
        node finishes before the next starts: yields each task after starting it; the caller
        runs it and calls `finish`. Streams are polled in a fixed order; if none can start
        anything while work remains, the plans deadlock and this raises."""
        order = list(streams) if streams is not None else sorted(self.streams)
        while not self.done:
            progressed = False
            for stream in order:
                task = self.next_node(stream)
                if task is None:
                    continue
                self.start(task)
                progressed = True
                yield task
                if task in self.streams[stream].running:
                    raise SemanticsError(f"task {task} was not finished before the next")
            if not progressed:
                raise SemanticsError(f"deadlock: nothing can run, {self._pending()} tasks left")

    def _pending(self) -> int:
        return sum(p.num_owned - p.num_done for p in self.plans.values())

    def forget(self, index: int) -> None:
        """Drop a plan's remaining nodes from every stream (an aborted unit)."""
        p = self.plans[index]
        for state in {id(s): s for s in p.streams if s is not None}.values():
            state.running = {t for t in state.running if t[0] != index}
            state.queue = deque(r for r in state.queue if r.index != index)
            state.heap = [h for h in state.heap if h[2] != index]
            heapq.heapify(state.heap)
            self._touched[state] = None
        p.waiting[:] = [DONE] * len(p.waiting)  # nothing of it is ready, or becomes so
        p.num_done = p.num_owned

    def release(self, index: int) -> None:
        """Let go of a finished (or forgotten) plan: a long-running executor holds only the
        plans in flight. Its index is never reused."""
        p = self.plans.get(index)
        if p is None:
            return
        if p.num_done != p.num_owned:
            raise SemanticsError(f"plan {index} is still running; forget it first")
        del self.plans[index]
        for state in p.used:
            state.users -= 1
        self._let_go(self._shapes[id(p.plan)])

    def _let_go(self, shape: _Shape) -> None:
        shape.users -= 1
        if not shape.users:
            del self._shapes[id(shape.plan)]
            self._released[id(shape.plan)] = shape
            if len(self._released) > KEEP_RELEASED:
                self._released.popitem(last=False)
