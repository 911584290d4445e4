"""A Hypothesis state machine over the execution semantics.

`SemanticsMachine` adds plans (random small graphs, each stream InOrder in a random
topological order, or ByPriority with random keys, fifo or not, coalescing by random merge
keys or not), then starts nodes or groups and finishes nodes in any
order the semantics allow (gates with random per-expert counts), and checks `Execution`
against an obviously correct model: a set of done nodes, and for each stream its rule
applied by brute force. Its `on_routing` hook must be asked exactly once per plan and set of
gates the routed Experts read, when the first such Expert becomes ready, with the summed
counts of those gates (all finished by then); what it answers is each Expert's `kernel`.

    TestSemantics = SemanticsMachine.TestCase      # in a test module
"""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from moeflow.dataflow.compiler import Cut, compile
from moeflow.dataflow.graph import Expert, Gate, Graph, Placement, SeqChunk, Unit
from moeflow.scheduler.plan import ByPriority, InOrder, Plan, Stream, node_stream
from moeflow.scheduler.semantics import Execution, Task
from moeflow.testing.strategies import model_cases


def _routed(graph: Graph, layer: int | None = None) -> list[Expert]:
    return [n for n in graph.nodes if isinstance(n, Expert) and n.kind == "routed"
            and (layer is None or n.layer == layer)]


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
        self.execution = Execution(on_routing=self._on_routing)
        self.plans: list[Plan] = []
        self.counts: dict[Task, tuple[int, ...]] = {}  # finished gates' counts
        # (plan, the gates its routed Experts read) -> what on_routing answered
        self.asked: dict[tuple[int, tuple[int, ...]], dict[tuple[int, ...], str]] = {}
        self.done: set[Task] = set()
        self.running: dict[Stream, set[Task]] = {}  # a node, or a coalesced group
        self.issue: dict[Stream, list[Task]] = {}  # InOrder: the remaining sequence
        self.fifo: set[Stream] = set()
        self.coalesce: set[Stream] = set()
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
                prior = data.draw(st.sampled_from([InOrder, ByPriority, "fifo", "coalesce"]),
                                  label=f"rule {s}")
                if prior == "coalesce":
                    self.coalesce.add(s)
                    if data.draw(st.booleans(), label=f"fifo {s}"):
                        self.fifo.add(s)
                    prior = ByPriority
                elif prior == "fifo":
                    self.fifo.add(s)
                    prior = ByPriority
            kinds[s] = prior
        order = random_topological(graph, data.draw)
        rules = []
        for s in streams:
            if kinds[s] is InOrder:
                rules.append((s, InOrder(tuple(i for i in order if assignment[i] == s))))
            else:
                rules.append((s, ByPriority(coalesce=s in self.coalesce, fifo=s in self.fifo)))
        keys = tuple((float(data.draw(st.integers(0, 2), label="key")),)  # many ties
                     for i in range(len(graph.nodes)))
        merge = tuple(None if (k := data.draw(st.integers(-1, 1), label="merge")) < 0
                      else ("k", k) for _ in graph.nodes)
        plan = Plan(graph, assignment, tuple(rules), keys, merge)
        index = self.execution.add(plan)
        self.plans.append(plan)
        for s, r in rules:
            if isinstance(r, InOrder):
                self.issue.setdefault(s, []).extend((index, i) for i in r.order)
        del existing
        self._note_ready()

    def _on_routing(self, index: int, layer: int, counts: tuple[int, ...],
                    groups: tuple[tuple[int, ...], ...]) -> dict[tuple[int, ...], str]:
        graph = self.plans[index].graph
        experts = [n for n in _routed(graph, layer) if n.experts in groups]
        reads = {graph.gates_read(n.id) for n in experts}
        assert len(reads) == 1, reads  # one routing: Experts that read the same gates
        gates = reads.pop()
        assert (index, gates) not in self.asked, f"asked twice for plan {index}, gates {gates}"
        assert all((index, g) in self.counts for g in gates)
        assert counts == tuple(map(sum, zip(*(self.counts[(index, g)] for g in gates))))
        assert groups == tuple(dict.fromkeys(
            n.experts for n in _routed(graph, layer) if graph.gates_read(n.id) == gates))
        # answer with a kernel for every other group, so some are left to the executor
        answer = {g: ("dense", "grouped")[i % 2] for i, g in enumerate(groups) if i % 3 != 2}
        self.asked[(index, gates)] = answer
        return answer

    def _note_ready(self) -> None:
        """Stamp the tasks that just became ready with this event's number."""
        self.events += 1
        for p, plan in enumerate(self.plans):
            for i in range(len(plan.graph.nodes)):
                if (p, i) not in self.became_ready and self._ready((p, i)):
                    self.became_ready[(p, i)] = self.events

    def _ready(self, task: Task) -> bool:
        plan = self.plans[task[0]]
        return (task not in self.done and not any(task in g for g in self.running.values())
                and all((task[0], p) in self.done for p in plan.graph.preds(task[1])))

    def _key(self, stream: Stream, task: Task) -> tuple[object, ...]:
        fifo = self.became_ready[task] if stream in self.fifo else 0
        return (self.plans[task[0]].priority[task[1]], fifo, task[0], task[1])

    def _expected_group(self, stream: Stream) -> tuple[Task, ...] | None:
        head = self._expected_next(stream)
        if head is None or stream not in self.coalesce:
            return None if head is None else (head,)
        key = self.plans[head[0]].merge[head[1]]
        if key is None:
            return (head,)
        ready = [(p, i) for p, plan in enumerate(self.plans)
                 for i, s in enumerate(plan.assignment)
                 if s == stream and (p, i) != head and self._ready((p, i))]
        mates = [t for t in ready if self.plans[t[0]].merge[t[1]] == key]
        left = [self.plans[t[0]].priority[t[1]] for t in ready if t not in mates]
        # a mate joins unless a ready node left out ranks strictly before it
        mates = [t for t in mates if all(k >= self.plans[t[0]].priority[t[1]] for k in left)]
        return (head, *sorted(mates, key=lambda t: self._key(stream, t)))

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
        return min(ready, key=lambda t: self._key(stream, t))

    @rule(data=st.data())
    def start_one(self, data: st.DataObject) -> None:
        startable = [(s, g) for s in self.execution.streams
                     if (g := self.execution.next_group(s)) is not None]
        if not startable:
            return
        stream, group = data.draw(st.sampled_from(startable), label="start")
        assert self._expected_group(stream) == group, (stream, group,
                                                       self._expected_group(stream))
        if data.draw(st.booleans(), label="head alone"):
            group = group[:1]  # a coalescing stream may also start its head alone
        self.execution.start(group)
        self.running[stream] = set(group)
        if stream in self.issue:
            self.issue[stream].pop(0)

    @precondition(lambda self: bool(self.running))
    @rule(data=st.data())
    def finish_one(self, data: st.DataObject) -> None:
        stream = data.draw(st.sampled_from(sorted(self.running)), label="finish")
        task = data.draw(st.sampled_from(sorted(self.running[stream])), label="task")
        self.running[stream].discard(task)
        if not self.running[stream]:  # a group keeps its stream busy until all are done
            del self.running[stream]
        node = self.plans[task[0]].graph.nodes[task[1]]
        counts = None
        if isinstance(node, Gate):
            counts = self.counts[task] = tuple(data.draw(st.lists(
                st.integers(0, 3), min_size=len(self.plans[task[0]].graph.placement
                                                .expert_owners),
                max_size=len(self.plans[task[0]].graph.placement.expert_owners)),
                label="counts"))
        self.execution.finish(task, counts)
        assert task not in self.done
        self.done.add(task)
        self._note_ready()

    @invariant()
    def next_nodes_agree_with_the_model(self) -> None:
        for stream in self.execution.streams:
            assert self.execution.next_node(stream) == self._expected_next(stream), stream
            assert self.execution.next_group(stream) == self._expected_group(stream), stream

    @invariant()
    def on_routing_asked_once_a_routed_expert_was_ready(self) -> None:
        for p, plan in enumerate(self.plans):
            for node in _routed(plan.graph):
                key = (p, plan.graph.gates_read(node.id))
                reached = (p, node.id) in self.became_ready
                assert (key in self.asked) >= reached, (p, node)
                if reached:
                    want = self.asked[key].get(node.experts)
                    assert self.execution.kernel((p, node.id)) == want
        for p, gates in self.asked:
            graph = self.plans[p].graph
            assert any((p, n.id) in self.became_ready for n in _routed(graph)
                       if graph.gates_read(n.id) == gates)

    @invariant()
    def one_node_per_stream_and_progress_possible(self) -> None:
        for s in self.execution.streams:
            group = self.running.get(s)
            assert self.execution.busy(s) == (min(group) if group else None), s
        unfinished = sum(len(p.graph.nodes) for p in self.plans) - len(self.done)
        if unfinished and not self.running:
            # static sequences are topological and priorities pick among ready nodes, so
            # some stream can always start something
            assert any(self.execution.next_node(s) is not None for s in self.execution.streams)
        assert self.execution.done == (unfinished == 0)
