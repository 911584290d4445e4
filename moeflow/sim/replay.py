"""Plans replayed for many units: what the simulator reads of a plan at every event, as flat
per-node arrays built once per Plan object, and the sizes of each unit bound to them.

A scheduler with a `plan_key` shares one plan among the units of one shape (the engine's
PlanCache); only the unit (which sequences, how many tokens and how much context) changes
from step to step. A graph's nodes carry the sizes of the unit it was compiled for, so the
simulator never costs them as they are: `bind(node, unit, seqs)` is the node as compiled
for `unit`, and a plan is replayed for another unit only if binding its own unit gives back
its own nodes (`PlanTable.rebindable`), which holds for everything `compile` builds. A node
that serves every sequence of its home is bound to the sequences the unit homes there, so a
plan is replayed right for a unit of another shape but the same structure, should a
scheduler's key share plans that widely.

    table = PlanTable.of(plan, devices)
    table.code[n], table.slot[n], table.inputs[n], ...      per node, by node id
    bind(node, unit, seqs)                                   the node's sizes for `unit`
    unit = BoundUnit.of(job, table, RowCosts(cost))          a plan in flight for job.unit
    unit.dur[n], unit.nbytes[n]                              per node, once known

Pure: plain data.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Hashable, Sequence
from typing import Any

from moeflow.dataflow.graph import Attention, Expert, Gate, Graph, Node, Transfer, Unit
from moeflow.dataflow.kinds import KINDS
from moeflow.models.spec import ModelSpec
from moeflow.scheduler.plan import Plan
from moeflow.scheduler.requests import Job
from moeflow.sim.cost import NodeCost, RowCosts
from moeflow.sim.workload import Routing

# What a node's cost and output depend on, besides its plan:
STATIC = 0  # its sizes alone (bound from the unit): the same for every node of its slot
GATE = 1  # static, and it draws its layer's per-expert counts when it starts
ROUTED = 2  # routed experts: the rows the gates of its layer sent them
MOVED = 3  # a dispatch: the rows of its home's gate for its experts
RETURNED = 4  # a combine: its experts' rows, from the gates of the homes it returns them to


def bind(node: Node, unit: Unit, seqs: tuple[int, ...]) -> Node:
    """`node` with the sequences and sizes `compile` gives it for `unit`, where it serves the
    sequences `seqs` of the unit (by index): tokens, context and logit rows (its kind's
    `bind`, moeflow.dataflow.kinds)."""
    return KINDS[type(node)].bind(node, unit, seqs)  # type: ignore[no-any-return]


def output_bytes(spec: ModelSpec, dtype_bytes: int, node: Node) -> float:
    """Bytes a node with static sizes leaves on its device for its consumers (its kind's
    `output_bytes`)."""
    return KINDS[type(node)].output_bytes(spec, dtype_bytes, node)


# a static node's sizes, those `bind` sets, by its kind
_SIZES: dict[type, Any] = {cls: kind.sizes for cls, kind in KINDS.items()}


@dataclasses.dataclass(frozen=True, eq=False)
class PlanTable:
    """Flat per-node arrays of one plan, by node id."""

    plan: Plan
    code: tuple[int, ...]  # STATIC, GATE, ROUTED, MOVED or RETURNED
    slot: tuple[int, ...]  # STATIC and GATE: index in `slots`; else -1
    # a node of each cost, its sequences, and its home if they are all its home's (then a
    # unit of another shape binds its own sequences there)
    slots: tuple[tuple[Node, tuple[int, ...], str | None], ...]
    # the device (index) its output is held on; -1: not tracked. A transfer's rows are
    # held on its destination, or on its sender when it has several (its part of an
    # all-to-all: the send buffer)
    out_dev: tuple[int, ...]
    # RETURNED -> the gates whose rows its experts took, and the gate of the home it does
    # not return them to (its sender's own, -1 if none): it moves the difference
    returned_of: dict[int, tuple[tuple[int, ...], int]]
    resource: tuple[str, ...]  # its stream, "actor/stream"
    rid: tuple[int, ...]  # its stream's number in the `resources` given to `of`
    stream_ids: tuple[int, ...]  # the numbers of the streams the plan uses
    inputs: tuple[tuple[int, ...], ...]  # data inputs
    uses: tuple[int, ...]  # data edges reading its output
    roots: tuple[int, ...]  # nodes without predecessors
    gates: tuple[tuple[int, ...], ...]  # ROUTED: the gates of its layer; MOVED: its home's;
    # RETURNED: those of the homes it goes to
    span: tuple[tuple[int, int] | None, ...]  # ROUTED, MOVED, RETURNED: its experts as a
    # range, if they are one
    gate_nodes: tuple[int, ...]  # every GATE
    # gate -> the MOVED nodes its draw sizes, by the experts they move rows of: (their
    # slice of the gate's counts if a range, whether they stay on one device, one of them,
    # all of them). A combine (RETURNED) is sized as it starts, its homes' gates all drawn
    moved_of: dict[int, tuple[tuple[slice | None, bool, Transfer, tuple[int, ...]], ...]]
    # the gates whose rows routed experts take (a layer's, or a micro-batch's) -> those
    # ROUTED nodes, and each gate -> the groups of gates it is in
    routed_of: dict[tuple[int, ...], tuple[int, ...]]
    groups_of_gate: dict[int, tuple[tuple[int, ...], ...]]
    rebindable: bool  # binding the graph's own unit gives back every node

    @staticmethod
    def of(plan: Plan, devices: Sequence[str], resources: dict[str, int] | None = None
           ) -> PlanTable:
        """`resources` numbers streams across the plans of a run ("actor/stream" -> its
        number); streams it lacks are added."""
        graph = plan.graph
        unit, nodes = graph.unit, graph.nodes
        device_index = {d: i for i, d in enumerate(devices)}
        # (layer, device, micro-batch) -> its gate
        gate_at: dict[tuple[int, str, int], int] = {}
        layer_gates: dict[int, list[int]] = {}
        of_seq = graph.micro_batch_of_seq
        for node in nodes:
            if type(node) is Gate:
                gate_at[(node.layer, node.device, of_seq[node.seqs[0]])] = node.id
                layer_gates.setdefault(node.layer, []).append(node.id)
        layer_gate_tuples = {layer: tuple(g) for layer, g in layer_gates.items()}
        slot_of: dict[tuple[Hashable, int], int] = {}  # (cost key, id(seqs)) -> slot
        slots: list[tuple[Node, tuple[int, ...], str | None]] = []
        first_sizes: list[Any] = []  # per slot: its first node's sizes
        spans: dict[int, tuple[int, int] | None] = {}  # id(experts) -> its range
        home_seqs: dict[str, tuple[int, ...]] = {}
        moved_of: dict[int, dict[tuple[int, bool], list[Any]]] = {}  # by id(experts), same
        routed_of: dict[tuple[int, ...], list[int]] = {}
        n = len(nodes)
        code, slot, out_dev = [STATIC] * n, [-1] * n, [-1] * n
        returned_of: dict[int, tuple[tuple[int, ...], int]] = {}
        gates: list[tuple[int, ...]] = [()] * n
        span: list[tuple[int, int] | None] = [None] * n
        rebindable = True
        for i, node in enumerate(nodes):
            kind = type(node)
            experts: tuple[int, ...] = getattr(node, "experts", ())
            if experts:  # by identity: the nodes of one expert group share their tuple
                bounds = spans.get(id(experts), False)
                if bounds is False:
                    bounds = spans[id(experts)] = (
                        (experts[0], experts[-1] + 1)
                        if experts == tuple(range(experts[0], experts[-1] + 1)) else None)
                span[i] = bounds  # type: ignore[assignment]
            if kind is Transfer:
                dsts = node.dsts  # type: ignore[union-attr]
                out_dev[i] = device_index.get(dsts[0] if len(dsts) == 1 else node.src, -1)  # type: ignore
                if node.payload == "combine":  # type: ignore[union-attr]
                    code[i] = RETURNED
                    gates[i] = tuple(gate_at[(node.layer, h, node.micro_batch)]  # type: ignore
                                     for h in dsts)
                    if len(dsts) == 1:
                        returned_of[i] = (gates[i], -1)
                    else:  # every home's rows but its sender's own
                        returned_of[i] = (graph.gates_read(graph.inputs(i)[0]),
                                          gate_at.get((node.layer, node.src,  # type: ignore
                                                      node.micro_batch), -1))  # type: ignore
                    continue
                if node.payload == "dispatch":  # type: ignore[union-attr]
                    code[i] = MOVED
                    gate = gate_at[(node.layer, node.src,  # type: ignore[union-attr]
                                    node.micro_batch)]  # type: ignore[union-attr]
                    gates[i] = (gate,)
                    by_rows = moved_of.get(gate)
                    if by_rows is None:
                        by_rows = moved_of[gate] = {}
                    same = dsts == (node.src,)  # type: ignore[union-attr]
                    group = by_rows.get((id(experts), same))
                    if group is None:
                        bounds = span[i]
                        group = by_rows[(id(experts), same)] = [
                            slice(*bounds) if bounds else None, same, node, []]
                    group[-1].append(i)
                    continue
                cost_key: Hashable = (kind, dsts == (node.src,), dsts,  # type: ignore
                                      node.payload, len(experts), node.num_bytes,  # type: ignore
                                      node.part)  # type: ignore[union-attr]
                seqs: tuple[int, ...] = ()
            else:
                device = node.device
                out_dev[i] = device_index.get(device, -1)
                if kind is Expert:
                    if node.kind == "routed":  # type: ignore[union-attr]
                        code[i] = ROUTED
                        read = graph.gates_read(i)
                        gates[i] = read
                        routed = routed_of.get(read)
                        if routed is None:
                            routed = routed_of[read] = []
                        routed.append(i)
                        continue
                    cost_key = (kind, node.kind)  # type: ignore[union-attr]
                    if graph.micro_batched:  # its micro-batch's: the attention it reads
                        seqs = graph.nodes[graph.inputs(i)[0]].seqs  # type: ignore[union-attr]
                    else:
                        seqs = home_seqs.get(device)  # type: ignore[assignment]
                        if seqs is None:
                            seqs = home_seqs[device] = unit.seqs_on(device)
                else:
                    cost_key = (kind, node.part) if kind is Attention else kind  # type: ignore
                    seqs = node.seqs  # type: ignore[union-attr]
                if kind is Gate:
                    code[i] = GATE
            index = slot_of.get((cost_key, id(seqs)))
            if index is None:
                index = slot_of[(cost_key, id(seqs))] = len(slots)
                home = None
                if kind is not Transfer:
                    home = node.device
                    everyone = home_seqs.get(home)
                    if everyone is None:
                        everyone = home_seqs[home] = unit.seqs_on(home)
                    if seqs != everyone:
                        home = None
                slots.append((node, seqs, home))
                first_sizes.append(_SIZES[kind](node))
                rebindable = rebindable and bind(node, unit, seqs) == node
            elif rebindable:  # a node of one slot has the sizes of the slot's first
                rebindable = _SIZES[kind](node) == first_sizes[index]
            slot[i] = index
        names: dict[str, str] = {}
        resource = tuple(names.setdefault(r, r)
                         for r in [f"{s.actor}/{s.name}" for s in plan.assignment])
        numbers = {} if resources is None else resources
        for r in names:
            numbers.setdefault(r, len(numbers))
        inputs: list[list[int]] = [[] for _ in nodes]
        uses = [0] * len(nodes)
        has_pred = [False] * len(nodes)
        for edge in graph.edges:  # one pass, in the order graph.inputs lists them
            has_pred[edge.dst] = True
            if edge.kind == "data":
                inputs[edge.dst].append(edge.src)
                uses[edge.src] += 1
        return PlanTable(plan, tuple(code), tuple(slot), tuple(slots), tuple(out_dev),
                         returned_of,
                         resource, tuple(map(numbers.__getitem__, resource)),
                         tuple(map(numbers.__getitem__, names)),
                         tuple(map(tuple, inputs)), tuple(uses),
                         tuple(i for i, p in enumerate(has_pred) if not p), tuple(gates),
                         tuple(span), tuple(itertools.chain(*layer_gate_tuples.values())),
                         {g: tuple((rows, same, node, tuple(ids)) for rows, same, node, ids
                                   in by_rows.values()) for g, by_rows in moved_of.items()},
                         {read: tuple(r) for read, r in routed_of.items()},
                         {g: tuple(read for read in routed_of if g in read)
                          for g in itertools.chain(*layer_gate_tuples.values())}, rebindable)


@dataclasses.dataclass(eq=False, slots=True)
class BoundUnit:
    """A plan in flight for one unit: its table, the unit's sizes bound per slot, each
    node's duration and output bytes once they are known, the rows its gates drew, and what
    its nodes' outputs hold while consumers still need them."""

    job: Job
    table: PlanTable
    graph: Graph
    nodes: tuple[Node, ...]
    costs: RowCosts
    dur: list[float | None]  # per node: seconds (None: a gate, or rows not drawn yet)
    nbytes: list[float]  # per node: output bytes (dynamic nodes: once their rows are drawn)
    static: list[tuple[float, float]]  # per slot: duration, output bytes
    bound: list[tuple[Node, NodeCost]]  # per slot: its node with this unit's sizes, cost
    uses: list[int]  # data uses left per node
    held: list[Any]  # output bytes held per node (None: nothing)
    counts: dict[int, tuple[int, ...]]  # gate node -> rows per expert
    gates_left: dict[tuple[int, ...], int]  # a group of gates -> those not yet drawn
    lanes: list[Any] | None  # a trace sink's, per node
    left: int  # nodes not yet finished
    # a group of gates -> the rows per expert they drew together
    layer_rows: dict[tuple[int, ...], tuple[int, ...]] = dataclasses.field(
        default_factory=dict)
    shown: TraceColumns | None = None  # how its nodes show in a recorded trace

    @staticmethod
    def of(job: Job, table: PlanTable, costs: RowCosts, lanes: list[Any] | None = None
           ) -> BoundUnit:
        """`job`'s unit bound to `table`: every slot costed once with the unit's sizes."""
        cost = costs.cost
        graph, unit = job.plan.graph, job.unit
        replayed = graph.unit != unit
        static, bound = [], []
        homed: dict[str, tuple[int, ...]] = {}
        for node, seqs, home in table.slots:
            if replayed:
                if home is not None:
                    seqs = homed.get(home)  # type: ignore[assignment]
                    if seqs is None:
                        seqs = homed[home] = unit.seqs_on(home)
                node = bind(node, unit, seqs)
            c = cost.cost(graph, node, (), unit)
            static.append((cost.time_of(node, c), output_bytes(cost.spec, cost.b, node)))
            bound.append((node, c))
        durations: list[float | None] = [d for d, _ in static]
        sizes = [b for _, b in static]
        durations.append(None)  # slot -1: not known before a gate draws
        sizes.append(0.0)
        n = len(graph.nodes)
        gates_left = {read: len(read) for read in table.routed_of}
        u = BoundUnit(job, table, graph, graph.nodes, costs,
                      list(map(durations.__getitem__, table.slot)),
                      list(map(sizes.__getitem__, table.slot)), static, bound,
                      list(table.uses), [None] * n, {}, gates_left, lanes, n)
        for gate in table.gate_nodes:
            u.dur[gate] = None  # a gate draws its rows when it starts
        for read, left in gates_left.items():
            if not left:  # experts that read no gate route no rows
                u._route(read)
        return u

    def draw(self, node_id: int, routing: Routing) -> float:
        """A gate starts: draw its per-expert rows, size the nodes they decide, and return
        its duration."""
        gate = self.bound[self.table.slot[node_id]][0]
        node = self.nodes[node_id]
        counts = self.counts[node_id] = routing.counts(
            node.layer, gate.num_tokens, node.device, self.graph.placement)  # type: ignore
        dur, nbytes, graph, costs = self.dur, self.nbytes, self.graph, self.costs
        moved_time, known, row_bytes = costs.moved, costs.moved_seconds, costs.row_bytes
        for rows, same, first, moved in self.table.moved_of.get(node_id, ()):
            num_rows = (sum(counts[rows]) if rows is not None else
                        sum(counts[e] for e in first.experts))
            seconds = known[same].get((num_rows, len(first.dsts)))
            if seconds is None:
                seconds = moved_time(graph, first, num_rows)
            size = num_rows * row_bytes
            for m in moved:
                dur[m] = seconds
                nbytes[m] = size
        for read in self.table.groups_of_gate.get(node_id, ()):
            left = self.gates_left[read]
            self.gates_left[read] = left - 1
            if left == 1:  # the group's last gate: its experts' rows are known
                self._route(read)
        return self.static[self.table.slot[node_id]][0]

    def _route(self, read: tuple[int, ...]) -> None:
        dur, nbytes, costs = self.dur, self.nbytes, self.costs
        for routed in self.table.routed_of[read]:
            rows = self.rows(routed)
            assert rows is not None  # every gate of the layer drew
            if not costs.adjusted:  # else sized as it starts, on the kernel chosen
                dur[routed] = costs.routed(self.graph, self.nodes[routed], rows)  # type: ignore
            nbytes[routed] = sum(rows) * costs.row_bytes

    def returned(self, node_id: int) -> int | None:
        """The rows a combine (RETURNED) moves; None if a gate it needs has not drawn."""
        gates, own = self.table.returned_of[node_id]
        if own >= 0 and own not in self.counts:
            return None
        counts = self.layer_rows.get(gates)
        if counts is None:
            if any(g not in self.counts for g in gates):
                return None
            counts = self.layer_rows[gates] = (
                self.counts[gates[0]] if len(gates) == 1 else
                tuple(map(sum, zip(*(self.counts[g] for g in gates)))))
        span = self.table.span[node_id]
        experts = self.nodes[node_id].experts  # type: ignore[union-attr]
        total = sum(counts[span[0]:span[1]]) if span else sum(counts[e] for e in experts)
        if own >= 0:
            mine = self.counts[own]
            total -= sum(mine[span[0]:span[1]]) if span else sum(mine[e] for e in experts)
        return total

    def rows(self, node_id: int) -> tuple[int, ...] | None:
        """Rows per expert of a routed Expert or a dispatch/combine Transfer; None if a
        gate of its layer has not drawn yet (the plan breaks precedence)."""
        node = self.nodes[node_id]
        experts = node.experts  # type: ignore[union-attr]
        counts: tuple[int, ...] | None
        if self.table.code[node_id] == MOVED:
            counts = self.counts.get(self.table.gates[node_id][0])
        else:
            gates = self.table.gates[node_id]
            counts = self.layer_rows.get(gates)
            if counts is None:
                if any(g not in self.counts for g in gates):
                    return None
                counts = self.layer_rows[gates] = (
                    tuple(map(sum, zip(*(self.counts[g] for g in gates)))) if gates
                    else (0,) * self.graph.placement.num_experts)
        if counts is None:
            return None
        span = self.table.span[node_id]
        return counts[span[0]:span[1]] if span else tuple(counts[e] for e in experts)


def node_label(node: Node) -> str:
    if isinstance(node, Transfer):
        return f"{node.payload} {node.src}->{','.join(node.dsts)} L{node.layer}"
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
