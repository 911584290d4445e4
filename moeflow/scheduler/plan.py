"""Plan: a Graph plus, for every node, the actor and stream that run it, plus each stream's
ordering rule.

A stream runs one node at a time. Its rule says which ready node goes next:
    InOrder(order)   a static issue sequence, as on a CUDA stream: the stream runs exactly
                     these nodes in this order, waiting for the next one to become ready;
    ByPriority()     among its ready nodes, the one with the smallest `Plan.priority` key;
    ByPriority(coalesce=True)
                     the same, and every other ready node on the stream with the same
                     `Plan.merge` key joins it, unless a ready node left out of the group
                     has a smaller priority key than its own (joining never lets a node
                     pass one that ranks before it): the group runs as one kernel
                     (weights read once for all of them) and the stream is busy until all
                     are done.
    ByPriority(fifo=True)
                     ties in the key go to the node that became ready first (nodes that
                     became ready at once: in the order their plans were added).

Between streams, the plan orders only what one thread must serialise: an actor runs all
its streams on one thread, and runs the nodes that start at the same moment on its `lead`
streams first (by default its transfers: data a peer waits for leaves before local compute
starts), then the others, in the order they started. The simulator's streams run at once:
there `lead` changes nothing.

Plans are plain frozen data with a valid-Python `repr`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from moeflow.dataflow.graph import Graph, GraphError, Transfer


@dataclass(frozen=True, slots=True, order=True)
class Stream:
    actor: str
    name: str = "compute"

    def __str__(self) -> str:
        return f"{self.actor}/{self.name}"


@dataclass(frozen=True, slots=True)
class InOrder:
    order: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ByPriority:
    coalesce: bool = False
    fifo: bool = False


Rule = Union[InOrder, ByPriority]
PriorityKey = tuple[float, ...]
MergeKey = Union[tuple[Union[str, int, float], ...], None]


LEAD = ("send", "h2d", "d2h")  # transfers before compute


class PlanError(ValueError):
    """A Plan does not fit its graph: a node without a stream, a stream without a rule, an
    InOrder sequence that is not exactly the stream's nodes."""


@dataclass(frozen=True)
class Plan:
    graph: Graph
    assignment: tuple[Stream, ...]
    rules: tuple[tuple[Stream, Rule], ...]
    priority: tuple[PriorityKey, ...] = ()
    merge: tuple[MergeKey, ...] = ()  # per node, for coalescing streams (None: never merges)
    lead: tuple[str, ...] = LEAD  # stream names run first where one thread runs them all

    def __post_init__(self) -> None:
        n = len(self.graph.nodes)
        if len(self.assignment) != n:
            raise PlanError(f"{len(self.assignment)} stream assignments for {n} nodes")
        rules = dict(self.rules)
        if len(rules) != len(self.rules):
            raise PlanError("a stream has two rules")
        members: dict[Stream, list[int]] = {}
        for node_id, stream in enumerate(self.assignment):
            members.setdefault(stream, []).append(node_id)
        for stream, nodes in members.items():
            rule = rules.get(stream)
            if rule is None:
                raise PlanError(f"stream {stream} has no rule")
            if isinstance(rule, InOrder) and sorted(rule.order) != nodes:
                raise PlanError(f"InOrder for {stream} lists {sorted(rule.order)[:8]}..., "
                                f"the stream holds {nodes[:8]}...")
            if isinstance(rule, ByPriority) and len(self.priority) != n:
                raise PlanError(f"stream {stream} is ByPriority but the plan has "
                                f"{len(self.priority)} priority keys for {n} nodes")
            if isinstance(rule, ByPriority) and rule.coalesce and len(self.merge) != n:
                raise PlanError(f"stream {stream} coalesces but the plan has "
                                f"{len(self.merge)} merge keys for {n} nodes")
        for stream in rules:
            if stream not in members:
                raise PlanError(f"stream {stream} has a rule but no nodes")
        if not isinstance(self.lead, tuple) or not all(
                isinstance(name, str) and name for name in self.lead):
            raise PlanError(f"lead must be a tuple of stream names, got {self.lead!r}")
        if len(set(self.lead)) != len(self.lead):
            raise PlanError(f"lead names a stream twice: {self.lead!r}")
        names = {stream.name for stream in rules}
        unknown = [name for name in self.lead if name not in names and name not in LEAD]
        if unknown:  # a misspelt name would lead nothing, silently
            raise PlanError(f"lead names {unknown}, which no stream of the plan has (its "
                            f"streams: {sorted(names)})")

    def rule(self, stream: Stream) -> Rule:
        return dict(self.rules)[stream]

    def streams(self) -> tuple[Stream, ...]:
        return tuple(s for s, _ in self.rules)

    def actors(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.actor for s in self.assignment))


def node_stream(graph: Graph, node_id: int) -> Stream:
    """The default stream of a node: compute on its device; transfers on the sender's
    `send` stream."""
    node = graph.nodes[node_id]
    if isinstance(node, Transfer):
        return Stream(node.src, "send")
    return Stream(node.device, "compute")


def topological_plan(graph: Graph) -> Plan:
    """Every node on its default stream, each stream issuing in topological order."""
    assignment = tuple(node_stream(graph, i) for i in range(len(graph.nodes)))
    orders: dict[Stream, list[int]] = {}
    for node_id in graph.topological_order():
        orders.setdefault(assignment[node_id], []).append(node_id)
    return Plan(graph, assignment,
                tuple((s, InOrder(tuple(o))) for s, o in sorted(orders.items())))


__all__ = ["LEAD", "ByPriority", "GraphError", "InOrder", "MergeKey", "Plan", "PlanError", "PriorityKey",
           "Rule", "Stream", "node_stream", "topological_plan"]
