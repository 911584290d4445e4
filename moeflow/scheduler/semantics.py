"""The one execution semantics of moeflow, shared by every executor.

    - each stream runs one node at a time;
    - a node is ready when all its predecessors are done;
    - a stream picks its next node by its rule (InOrder: the next in its sequence, once
      ready; ByPriority: the ready node with the smallest key);
    - a Gate's completion carries the per-expert row counts of its layer.

`Execution` holds this state for any number of Plans at once (units in flight together share
streams: fine-grained EP overlaps inputs on one actor). It knows nothing of time or tensors:
the in-process executor runs each started node right away, the simulator advances a clock
from a cost model, and the actors run nodes on real streams. All of them call only
`next_node`, `start` and `finish`, so they cannot disagree on what may run when.

Tasks are named (plan index, node id).

An actor runs the same semantics over whole plans but owns only its own streams: `add(plan,
owns=...)` leaves other actors' nodes out of every stream, and `finish_external(task)`
marks one of them done when its data or a notice arrives. A plan is done for such an
Execution when all the nodes it owns are.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from moeflow.dataflow.graph import Gate
from moeflow.scheduler.plan import ByPriority, InOrder, Plan, PriorityKey, Rule, Stream

Task = tuple[int, int]


class SemanticsError(RuntimeError):
    """A caller broke the semantics: started a node that is not ready or not its stream's
    turn, or started two on one stream."""


@dataclass(eq=False)
class _StreamState:
    stream: Stream
    rule_kind: type
    busy: Task | None = None
    queue: deque[Task] = field(default_factory=deque)  # InOrder: issue sequence
    heap: list[tuple[PriorityKey, int, int]] = field(default_factory=list)  # ByPriority


@dataclass
class _PlanState:
    plan: Plan
    waiting: list[int]  # unfinished predecessors per node
    done: list[bool]
    streams: list[_StreamState | None]  # per node; None: another actor's node
    num_owned: int = 0
    num_done: int = 0
    counts: dict[int, tuple[int, ...]] = field(default_factory=dict)  # layer -> per-expert rows


class Execution:
    def __init__(self, plans: Iterable[Plan] = ()) -> None:
        self.plans: list[_PlanState] = []
        self.streams: dict[Stream, _StreamState] = {}
        self._ready: set[Task] = set()
        self._touched: dict[Stream, None] = {}  # streams whose next node may have changed
        for plan in plans:
            self.add(plan)

    # -- building ------------------------------------------------------------------

    def add(self, plan: Plan, owns: Callable[[Stream], bool] | None = None) -> int:
        """Admit a plan; its nodes join their streams after those already there. With
        `owns`, only streams it accepts run here; the rest are finished externally."""
        index = len(self.plans)
        graph = plan.graph
        waiting = [len(graph.preds(i)) for i in range(len(graph.nodes))]
        for stream, rule in plan.rules:
            if owns is not None and not owns(stream):
                continue
            state = self.streams.get(stream)
            if state is None:
                state = self.streams[stream] = _StreamState(stream, type(rule))
            elif state.rule_kind is not type(rule):
                raise SemanticsError(f"stream {stream} is {state.rule_kind.__name__} in one "
                                     f"plan and {type(rule).__name__} in another")
            if isinstance(rule, InOrder):
                state.queue.extend((index, n) for n in rule.order)
            self._touched[stream] = None
        streams = [self.streams[s] if owns is None or owns(s) else None
                   for s in plan.assignment]
        self.plans.append(_PlanState(plan, waiting, [False] * len(graph.nodes), streams,
                                     sum(1 for s in streams if s is not None)))
        for node_id, n in enumerate(waiting):
            if n == 0 and streams[node_id] is not None:
                self._make_ready((index, node_id))
        return index

    def _make_ready(self, task: Task) -> None:
        plan_state = self.plans[task[0]]
        state = plan_state.streams[task[1]]
        if state is None:  # another actor's node: it finishes externally
            return
        self._ready.add(task)
        if state.rule_kind is ByPriority:
            heapq.heappush(state.heap, (plan_state.plan.priority[task[1]], task[0], task[1]))
        self._touched[state.stream] = None

    # -- queries -------------------------------------------------------------------

    def rule_of(self, task: Task) -> Rule:
        plan = self.plans[task[0]].plan
        return plan.rule(plan.assignment[task[1]])

    def stream_of(self, task: Task) -> Stream:
        return self.plans[task[0]].plan.assignment[task[1]]

    def next_node(self, stream: Stream) -> Task | None:
        """The task `stream` would start now, or None (busy, or nothing it may run)."""
        return self._next(self.streams[stream])

    def _next(self, state: _StreamState) -> Task | None:
        if state.busy is not None:
            return None
        if state.rule_kind is InOrder:
            if state.queue and state.queue[0] in self._ready:
                return state.queue[0]
            return None
        return (state.heap[0][1], state.heap[0][2]) if state.heap else None

    def is_ready(self, task: Task) -> bool:
        return task in self._ready

    def idle_streams(self) -> Iterator[Stream]:
        return (s for s, st in self.streams.items() if st.busy is None)

    def startable(self) -> list[Task]:
        """Every task some stream would start now (one per stream), checking only streams
        whose state changed since the last call. Start them, or call again later."""
        out = []
        touched, self._touched = self._touched, {}
        for stream in touched:
            task = self._next(self.streams[stream])
            if task is not None:
                out.append(task)
        return out

    @property
    def done(self) -> bool:
        return all(p.num_done == p.num_owned for p in self.plans)

    def plan_done(self, index: int) -> bool:
        p = self.plans[index]
        return p.num_done == p.num_owned

    def owns(self, task: Task) -> bool:
        return self.plans[task[0]].streams[task[1]] is not None

    def counts(self, plan_index: int, layer: int) -> tuple[int, ...] | None:
        """Per-expert row counts of `layer` once a Gate of that layer has finished (summed
        over the plan's gates that have)."""
        return self.plans[plan_index].counts.get(layer)

    def busy(self, stream: Stream) -> Task | None:
        return self.streams[stream].busy

    # -- transitions ---------------------------------------------------------------

    def start(self, task: Task) -> None:
        state = self.plans[task[0]].streams[task[1]]
        if state is None:
            raise SemanticsError(f"task {task} belongs to another actor")
        if self._next(state) != task:
            raise SemanticsError(f"task {task} on {state.stream} is not the stream's next "
                                 f"(next is {self._next(state)}, busy {state.busy})")
        if state.rule_kind is InOrder:
            state.queue.popleft()
        else:
            heapq.heappop(state.heap)
        self._ready.discard(task)
        state.busy = task

    def finish(self, task: Task, counts: tuple[int, ...] | None = None) -> list[Task]:
        """Mark `task` done; `counts` are its per-expert rows if it is a Gate. Returns the
        tasks that became ready."""
        plan_index, node_id = task
        p = self.plans[plan_index]
        state = p.streams[node_id]
        if state is None or state.busy != task:
            raise SemanticsError(f"task {task} finished but its stream is not running it")
        state.busy = None
        self._touched[state.stream] = None
        p.num_done += 1
        return self._complete(task, counts)

    def finish_external(self, task: Task, counts: tuple[int, ...] | None = None) -> list[Task]:
        """Another actor's node is done (its data or a notice arrived)."""
        if self.owns(task):
            raise SemanticsError(f"task {task} runs here; it cannot finish externally")
        if self.plans[task[0]].done[task[1]]:
            raise SemanticsError(f"task {task} finished twice")
        return self._complete(task, counts)

    def _complete(self, task: Task, counts: tuple[int, ...] | None) -> list[Task]:
        plan_index, node_id = task
        p = self.plans[plan_index]
        p.done[node_id] = True
        node = p.plan.graph.nodes[node_id]
        if isinstance(node, Gate) and counts is not None:
            prior = p.counts.get(node.layer)
            p.counts[node.layer] = (counts if prior is None
                                    else tuple(a + b for a, b in zip(prior, counts)))
        newly: list[Task] = []
        for succ in p.plan.graph.succs(node_id):
            p.waiting[succ] -= 1
            if p.waiting[succ] == 0:
                self._make_ready((plan_index, succ))
                newly.append((plan_index, succ))
        return newly

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
                if self.streams[stream].busy == task:
                    raise SemanticsError(f"task {task} was not finished before the next")
            if not progressed:
                raise SemanticsError(f"deadlock: nothing can run, {self._pending()} tasks left")

    def _pending(self) -> int:
        return sum(p.num_owned - p.num_done for p in self.plans)

    def forget(self, index: int) -> None:
        """Drop a plan's remaining nodes from every stream (an aborted unit)."""
        p = self.plans[index]
        for state in {id(s): s for s in p.streams if s is not None}.values():
            if state.busy is not None and state.busy[0] == index:
                state.busy = None
            state.queue = deque(t for t in state.queue if t[0] != index)
            state.heap = [h for h in state.heap if h[1] != index]
            heapq.heapify(state.heap)
            self._touched[state.stream] = None
        self._ready = {t for t in self._ready if t[0] != index}
        p.num_done = p.num_owned
