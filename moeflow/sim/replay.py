"""Plans replayed for many units: what the simulator reads of a plan at every event, as flat
per-node arrays built once per Plan object, and the sizes of each unit bound to them.

A scheduler with a `plan_key` shares one plan among the units of one shape (the engine's
PlanCache); only the unit (which sequences, how many tokens and how much context) changes
from step to step. A graph's nodes carry the sizes of the unit it was compiled for, so the
simulator never costs them as they are: `bind(node, unit, seqs)` is the node as compiled
for `unit`, and a plan is replayed for another unit only if binding its own unit gives back
its own nodes (`PlanTable.rebindable`), which holds for everything `compile` builds.

    table = PlanTable.of(plan, devices)
    table.code[n], table.slot[n], table.inputs[n], ...      per node, by node id
    bind(node, unit, seqs)                                   the node's sizes for `unit`
    unit = BoundUnit.of(job, table, cost)                    a plan in flight for job.unit

Pure: plain data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence
from typing import Any

from moeflow.dataflow.graph import (
    Attention, Combine, Embed, Expert, Gate, Graph, LMHead, Node, Transfer, Unit,
)
from moeflow.models.spec import ModelSpec
from moeflow.scheduler.plan import Plan
from moeflow.scheduler.requests import Job
from moeflow.sim.cost import CostModel, NodeCost
from moeflow.sim.workload import Routing

# What a node's cost and output depend on, besides its plan:
STATIC = 0  # its sizes alone (bound from the unit): the same for every node of its slot
GATE = 1  # static, and it draws its layer's per-expert counts when it starts
ROUTED = 2  # routed experts: the rows the gates of its layer sent them
MOVED = 3  # a dispatch or combine transfer: the rows of its home's gate for its experts


def bind(node: Node, unit: Unit, seqs: tuple[int, ...]) -> Node:
    """`node` with the sizes `compile` gives it for `unit`, where it serves the sequences
    `seqs` of the unit (by index): tokens, context and logit rows."""
    if isinstance(node, LMHead):
        return dataclasses.replace(node, num_rows=sum(unit.seqs[i].num_logit_rows for i in seqs))
    tokens = sum(unit.seqs[i].num_tokens for i in seqs)
    if isinstance(node, Attention):
        context = sum(unit.seqs[i].start + unit.seqs[i].num_tokens for i in seqs)
        return dataclasses.replace(node, num_tokens=tokens, num_context=context)
    if isinstance(node, (Embed, Gate, Combine)) or (isinstance(node, Expert)
                                                    and node.kind != "routed"):
        return dataclasses.replace(node, num_tokens=tokens)
    return node


def output_bytes(spec: ModelSpec, dtype_bytes: int, node: Node) -> float:
    """Bytes a node with static sizes leaves on its device for its consumers."""
    d = spec.hidden_size
    if isinstance(node, LMHead):
        return node.num_rows * spec.vocab_size * 4
    if isinstance(node, Transfer):
        return 0
    tokens = getattr(node, "num_tokens", 0)
    factor = 2 if isinstance(node, Attention) else 1
    if isinstance(node, Gate):
        factor = 1 + spec.moe.top_k
    if isinstance(node, (Embed, Combine, Expert, Attention, Gate)):
        return factor * tokens * d * dtype_bytes
    return 0.0


def _sizes(node: Node) -> tuple[int, int, int]:
    return (getattr(node, "num_tokens", 0), getattr(node, "num_context", 0),
            getattr(node, "num_rows", 0))


def _cost_key(node: Node) -> Hashable:
    """What a static node's cost depends on besides its sizes."""
    if isinstance(node, Attention):
        return "Attention", node.part
    if isinstance(node, Expert):
        return "Expert", node.kind
    if isinstance(node, Transfer):
        return "Transfer", node.src == node.dst, node.dst
    return type(node).__name__


@dataclasses.dataclass(frozen=True, eq=False)
class PlanTable:
    """Flat per-node arrays of one plan, by node id."""

    plan: Plan
    code: tuple[int, ...]  # STATIC, GATE, ROUTED or MOVED
    slot: tuple[int, ...]  # STATIC and GATE: index in `slots`; else -1
    slots: tuple[tuple[Node, tuple[int, ...]], ...]  # a node of each cost, and its sequences
    out_dev: tuple[int, ...]  # the device (index) its output lives on; -1: not tracked
    resource: tuple[str, ...]  # its stream, "actor/stream"
    inputs: tuple[tuple[int, ...], ...]  # data inputs
    uses: tuple[int, ...]  # data edges reading its output
    roots: tuple[int, ...]  # nodes without predecessors
    gates: tuple[tuple[int, ...], ...]  # ROUTED: the gates of its layer; MOVED: its home's
    span: tuple[tuple[int, int] | None, ...]  # ROUTED, MOVED: its experts as a range, if so
    rebindable: bool  # binding the graph's own unit gives back every node

    @staticmethod
    def of(plan: Plan, devices: Sequence[str]) -> PlanTable:
        graph = plan.graph
        unit, nodes = graph.unit, graph.nodes
        device_index = {d: i for i, d in enumerate(devices)}
        gate_at: dict[tuple[int, str], int] = {}
        layer_gates: dict[int, list[int]] = {}
        for node in nodes:
            if type(node) is Gate:
                gate_at[(node.layer, node.device)] = node.id
                layer_gates.setdefault(node.layer, []).append(node.id)
        layer_gate_tuples = {layer: tuple(g) for layer, g in layer_gates.items()}
        slot_of: dict[tuple[Hashable, int], int] = {}  # (cost key, id(seqs)) -> slot
        slots: list[tuple[Node, tuple[int, ...]]] = []
        spans: dict[tuple[int, ...], tuple[int, int] | None] = {}
        home_seqs: dict[str, tuple[int, ...]] = {}
        code, slot, out_dev, gates, span = [], [], [], [], []
        rebindable = True
        for node in nodes:
            kind = type(node)
            if kind is Transfer:
                out_dev.append(device_index.get(node.dst, -1))  # type: ignore[union-attr]
            else:
                out_dev.append(device_index.get(node.device, -1))
            experts = getattr(node, "experts", ())
            if experts:
                if experts not in spans:
                    spans[experts] = ((experts[0], experts[-1] + 1)
                                      if experts == tuple(range(experts[0], experts[-1] + 1))
                                      else None)
                span.append(spans[experts])
            else:
                span.append(None)
            if kind is Expert and node.kind == "routed":  # type: ignore[union-attr]
                code.append(ROUTED)
                slot.append(-1)
                gates.append(layer_gate_tuples.get(node.layer, ()))  # type: ignore[union-attr]
                continue
            if kind is Transfer and node.payload in ("dispatch", "combine"):  # type: ignore
                home = node.src if node.payload == "dispatch" else node.dst  # type: ignore
                code.append(MOVED)
                slot.append(-1)
                gates.append((gate_at[(node.layer, home)],))  # type: ignore[union-attr]
                continue
            seqs = getattr(node, "seqs", None)
            if seqs is None:
                if kind is Transfer:
                    seqs = ()
                else:
                    seqs = home_seqs.get(node.device)
                    if seqs is None:
                        seqs = home_seqs[node.device] = unit.seqs_on(node.device)
            key = (_cost_key(node), id(seqs))
            index = slot_of.get(key)
            if index is None:
                index = slot_of[key] = len(slots)
                slots.append((node, seqs))
                rebindable = rebindable and bind(node, unit, seqs) == node
            elif rebindable:  # a node of one slot has the sizes of the slot's first
                rebindable = _sizes(node) == _sizes(slots[index][0])
            code.append(GATE if kind is Gate else STATIC)
            slot.append(index)
            gates.append(())
        names: dict[str, str] = {}
        resource = tuple(names.setdefault(r, r)
                         for r in [f"{s.actor}/{s.name}" for s in plan.assignment])
        inputs: list[list[int]] = [[] for _ in nodes]
        uses = [0] * len(nodes)
        has_pred = [False] * len(nodes)
        for edge in graph.edges:  # one pass, in the order graph.inputs lists them
            has_pred[edge.dst] = True
            if edge.kind == "data":
                inputs[edge.dst].append(edge.src)
                uses[edge.src] += 1
        return PlanTable(plan, tuple(code), tuple(slot), tuple(slots), tuple(out_dev),
                         resource, tuple(map(tuple, inputs)), tuple(uses),
                         tuple(i for i, p in enumerate(has_pred) if not p), tuple(gates),
                         tuple(span), rebindable)


@dataclasses.dataclass(eq=False, slots=True)
class BoundUnit:
    """A plan in flight for one unit: its table, the unit's sizes bound per slot, the rows
    its gates drew, and what its nodes' outputs hold while consumers still need them."""

    job: Job
    table: PlanTable
    graph: Graph
    nodes: tuple[Node, ...]
    static: list[tuple[float, float]]  # per slot: duration, output bytes
    bound: list[tuple[Node, NodeCost]]  # per slot: its node with this unit's sizes, cost
    uses: list[int]  # data uses left per node
    held: list[Any]  # output bytes held per node (None: nothing)
    counts: dict[int, tuple[int, ...]]  # gate node -> rows per expert
    lanes: list[Any] | None  # a trace sink's, per node
    left: int  # nodes not yet finished
    layer_rows: dict[int, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    shown: TraceColumns | None = None  # how its nodes show in a recorded trace

    @staticmethod
    def of(job: Job, table: PlanTable, cost: CostModel, lanes: list[Any] | None = None
           ) -> BoundUnit:
        """`job`'s unit bound to `table`: every slot costed once with the unit's sizes."""
        graph, unit = job.plan.graph, job.unit
        replayed = graph.unit != unit
        static, bound = [], []
        for node, seqs in table.slots:
            node = bind(node, unit, seqs) if replayed else node
            c = cost.cost(graph, node, (), unit)
            static.append((cost.time_of(node, c), output_bytes(cost.spec, cost.b, node)))
            bound.append((node, c))
        n = len(graph.nodes)
        return BoundUnit(job, table, graph, graph.nodes, static, bound, list(table.uses),
                         [None] * n, {}, lanes, n)

    def draw(self, node_id: int, routing: Routing) -> None:
        """A gate starts: draw its per-expert rows."""
        gate = self.bound[self.table.slot[node_id]][0]
        node = self.nodes[node_id]
        self.counts[node_id] = routing.counts(
            node.layer, gate.num_tokens, node.device, self.graph.placement)  # type: ignore

    def rows(self, node_id: int) -> tuple[int, ...] | None:
        """Rows per expert of a routed Expert or a dispatch/combine Transfer; None if a
        gate of its layer has not drawn yet (the plan breaks precedence)."""
        node = self.nodes[node_id]
        experts = node.experts  # type: ignore[union-attr]
        counts: tuple[int, ...] | None
        if self.table.code[node_id] == MOVED:
            counts = self.counts.get(self.table.gates[node_id][0])
        else:
            counts = self.layer_rows.get(node.layer)  # type: ignore[union-attr]
            if counts is None:
                gates = self.table.gates[node_id]
                if any(g not in self.counts for g in gates):
                    return None
                counts = self.layer_rows[node.layer] = (  # type: ignore[union-attr]
                    tuple(map(sum, zip(*(self.counts[g] for g in gates)))) if gates
                    else (0,) * self.graph.placement.num_experts)
        if counts is None:
            return None
        span = self.table.span[node_id]
        return counts[span[0]:span[1]] if span else tuple(counts[e] for e in experts)


def node_label(node: Node) -> str:
    if isinstance(node, Transfer):
        return f"{node.payload} {node.src}->{node.dst} L{node.layer}"
    if isinstance(node, Expert):
        what = node.kind if node.kind != "routed" else (
            f"e{node.experts[0]}-{node.experts[-1]}" if node.experts else "e-")
        return f"Expert L{node.layer} {what}"
    layer = getattr(node, "layer", None)
    return type(node).__name__ + ("" if layer is None else f" L{layer}")


@dataclasses.dataclass(frozen=True, slots=True)
class TraceColumns:
    """How each node of a plan shows in a trace, by node id (its resource is the table's):
    the same for every unit the plan is replayed for."""

    name: tuple[str, ...]
    kind: tuple[str, ...]
    layer: tuple[int | None, ...]

    @staticmethod
    def of(plan: Plan) -> TraceColumns:
        nodes = plan.graph.nodes
        return TraceColumns(tuple(map(node_label, nodes)),
                            tuple(type(n).__name__ for n in nodes),
                            tuple(getattr(n, "layer", None) for n in nodes))
