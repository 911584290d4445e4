"""A Hypothesis state machine over the execution semantics.

`SemanticsMachine` adds plans (random small graphs, each stream InOrder in a random
topological order, or ByPriority with random keys, fifo or not), then starts and finishes nodes in any
order the semantics allow, and checks `Execution` against an obviously correct model:
a set of done nodes, and for each stream its rule applied by brute force.

    TestSemantics = SemanticsMachine.TestCase      # in a test module
"""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from moeflow.dataflow.compiler import Cut, compile
from moeflow.dataflow.graph import Graph, Placement, SeqChunk, Unit
from moeflow.scheduler.plan import ByPriority, InOrder, Plan, Stream, node_stream
from moeflow.scheduler.semantics import Execution, Task
from moeflow.testing.strategies import model_cases


def random_topological(graph: Graph, rng: st.DrawFn) -> list[int]:
    """A topological order of `graph`, choosing among ready nodes at random."""
    waiting = [len(graph.preds(i)) for i in range(len(graph.nodes))]
    ready = [i for i, w in enumerate(waiting) if w == 0]
    order = []
    while ready:
        i = ready.pop(rng(st.integers(0, len(ready) - 1)))
        order.append(i)
        for j in graph.succs(i):
            waiting[j] -= 1
            if waiting[j] == 0:
                ready.append(j)
    return order


class SemanticsMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.execution = Execution()
        self.plans: list[Plan] = []
        self.done: set[Task] = set()
        self.running: dict[Stream, Task] = {}
        self.issue: dict[Stream, list[Task]] = {}  # InOrder: the remaining sequence
        self.fifo: set[Stream] = set()
        self.became_ready: dict[Task, int] = {}  # the event at which each task did
        self.events = 0

    @precondition(lambda self: len(self.plans) < 3)
    @rule(data=st.data())
    def add_plan(self, data: st.DataObject) -> None:
        case = data.draw(model_cases(), label="model")
        spec = case.spec
        n = data.draw(st.integers(1, 3), label="devices")
        devices = tuple(f"cpu:{i}" for i in range(n))
        homes = data.draw(st.lists(st.sampled_from(devices), min_size=1, max_size=2),
                          label="homes")
        unit = Unit(tuple(SeqChunk(len(self.plans) * 10 + i, 0, 2, h)
                          for i, h in enumerate(homes)))
        graph = compile(spec, unit, Placement.sharded(devices, spec.moe.num_experts),
                        Cut(expert_stages=data.draw(st.integers(1, 2), label="stages")))
        assignment = tuple(node_stream(graph, i) for i in range(len(graph.nodes)))
        streams = sorted(set(assignment))
        existing = {s for p in self.plans for s, _ in p.rules}
        kinds = {}
        for s in streams:  # a stream keeps one rule kind across plans
            prior = next((type(r) for p in self.plans for t, r in p.rules if t == s), None)
            if prior is None:
                prior = data.draw(st.sampled_from([InOrder, ByPriority, "fifo"]),
                                  label=f"rule {s}")
                if prior == "fifo":
                    self.fifo.add(s)
                    prior = ByPriority
            kinds[s] = prior
        order = random_topological(graph, data.draw)
        rules = []
        for s in streams:
            if kinds[s] is InOrder:
                rules.append((s, InOrder(tuple(i for i in order if assignment[i] == s))))
            else:
                rules.append((s, ByPriority(fifo=s in self.fifo)))
        keys = tuple((float(data.draw(st.integers(0, 2), label="key")),)  # many ties
                     for i in range(len(graph.nodes)))
        plan = Plan(graph, assignment, tuple(rules), keys)
        index = self.execution.add(plan)
        self.plans.append(plan)
        for s, r in rules:
            if isinstance(r, InOrder):
                self.issue.setdefault(s, []).extend((index, i) for i in r.order)
        del existing
        self._note_ready()

    def _note_ready(self) -> None:
        """Stamp the tasks that just became ready with this event's number."""
        self.events += 1
        for p, plan in enumerate(self.plans):
            for i in range(len(plan.graph.nodes)):
                if (p, i) not in self.became_ready and self._ready((p, i)):
                    self.became_ready[(p, i)] = self.events

    def _ready(self, task: Task) -> bool:
        plan = self.plans[task[0]]
        return task not in self.done and task not in self.running.values() and all(
            (task[0], p) in self.done for p in plan.graph.preds(task[1]))

    def _expected_next(self, stream: Stream) -> Task | None:
        if stream in self.running:
            return None
        if stream in self.issue:
            queue = self.issue[stream]
            return queue[0] if queue and self._ready(queue[0]) else None
        candidates = [(p, i) for p, plan in enumerate(self.plans)
                      for i, s in enumerate(plan.assignment) if s == stream]
        ready = [t for t in candidates if self._ready(t)]
        if not ready:
            return None
        fifo = stream in self.fifo
        return min(ready, key=lambda t: (self.plans[t[0]].priority[t[1]],
                                         self.became_ready[t] if fifo else 0, t[0], t[1]))

    @rule(data=st.data())
    def start_one(self, data: st.DataObject) -> None:
        startable = [(s, t) for s in self.execution.streams
                     if (t := self.execution.next_node(s)) is not None]  # heads, started alone
        if not startable:
            return
        stream, task = data.draw(st.sampled_from(startable), label="start")
        assert self._expected_next(stream) == task, (stream, task, self._expected_next(stream))
        self.execution.start(task)
        self.running[stream] = task
        if stream in self.issue:
            self.issue[stream].pop(0)

    @precondition(lambda self: bool(self.running))
    @rule(data=st.data())
    def finish_one(self, data: st.DataObject) -> None:
        stream = data.draw(st.sampled_from(sorted(self.running)), label="finish")
        task = self.running.pop(stream)
        self.execution.finish(task)
        assert task not in self.done
        self.done.add(task)
        self._note_ready()

    @invariant()
    def next_nodes_agree_with_the_model(self) -> None:
        for stream in self.execution.streams:
            assert self.execution.next_node(stream) == self._expected_next(stream), stream

    @invariant()
    def one_node_per_stream_and_progress_possible(self) -> None:
        busy = [self.execution.busy(s) for s in self.execution.streams]
        assert all(b == self.running.get(s) for s, b in zip(self.execution.streams, busy))
        unfinished = sum(len(p.graph.nodes) for p in self.plans) - len(self.done)
        if unfinished and not self.running:
            # static sequences are topological and priorities pick among ready nodes, so
            # some stream can always start something
            assert any(self.execution.next_node(s) is not None for s in self.execution.streams)
        assert self.execution.done == (unfinished == 0)
