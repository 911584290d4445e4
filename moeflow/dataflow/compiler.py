"""`compile`: (ModelSpec, Unit, Placement, Cut) -> the Graph of one forward pass.

Per layer and per home device h (a device serving some of the unit's sequences):

    Attention(h) -> Gate(h) -> Transfer(dispatch, h->owners) -> Expert(d, group)
                                                                       |
                    Combine(h) <- Transfer(combine, d->homes) <--------+
                 (Combine(h) also reads Attention(h) for the residual, Gate(h) for the row
                  order, and Expert(h, shared) when the model has a shared expert)

Rows routed to experts that h itself owns skip the transfers. An owner's Expert node for a
group takes the rows of every home at once. Each home's dispatch is one Transfer to every
other owner (its part of the all-to-all), and each owner's combine one Transfer back to
every other home. A dense layer is Attention -> Expert(dense) ->
Combine. The first layer reads Embed(h); LMHead(h) reads the last Combine.

The Cut says how a policy wants the graph cut:
    expert_stages  split each owner's experts into that many contiguous groups, each its own
                   dispatch -> GEMM -> combine stage (EPS-MoE pipelining);
    barrier        every device finishes layer l before any device starts layer l+1 (the
                   collective all-to-all of batch expert parallelism; per micro-batch);
    micro_batches  deal each home's sequences (prefills, then decodes, in turn: `cut_seqs`)
                   into up to that many micro-batches, each its own chain Embed -> ... ->
                   LMHead with its own gates, transfers, expert GEMMs and combines
                   (`micro_batch` names its Expert and Transfer nodes), so that a policy can
                   overlap one micro-batch's compute with another's transfers. Chains are
                   built in micro-batch order (`Graph.micro_batch_of_seq`).
"""

from __future__ import annotations

from dataclasses import dataclass

from moeflow.dataflow.graph import (
    Attention,
    Combine,
    Edge,
    EdgeKind,
    Embed,
    Expert,
    Gate,
    Graph,
    GraphError,
    LMHead,
    Node,
    Placement,
    Transfer,
    Unit,
)
from moeflow.models.spec import ModelSpec


@dataclass(frozen=True, slots=True)
class Cut:
    expert_stages: int = 1
    barrier: bool = False
    micro_batches: int = 1

    def __post_init__(self) -> None:
        if self.expert_stages < 1:
            raise GraphError(f"expert_stages must be >= 1, got {self.expert_stages}")
        if self.micro_batches < 1:
            raise GraphError(f"micro_batches must be >= 1, got {self.micro_batches}")


def split_groups(experts: tuple[int, ...], num_groups: int) -> list[tuple[int, ...]]:
    """`experts` cut into `num_groups` contiguous, near-equal, non-empty groups (fewer when
    there are fewer experts than groups)."""
    n = min(num_groups, len(experts))
    bounds = [len(experts) * g // n for g in range(n + 1)]
    return [experts[bounds[g]:bounds[g + 1]] for g in range(n)]


class _Builder:
    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.edges: list[Edge] = []

    def add(self, cls: type, *inputs: int, **fields: object) -> int:
        node_id = len(self.nodes)
        self.nodes.append(cls(id=node_id, **fields))
        self.edges.extend(Edge(src, node_id) for src in inputs)
        return node_id

    def edge(self, src: int, dst: int, kind: EdgeKind) -> None:
        self.edges.append(Edge(src, dst, kind))


def cut_seqs(unit: Unit, seqs: tuple[int, ...], parts: int) -> list[tuple[int, ...]]:
    """`seqs` (one home's) dealt into at most `parts` non-empty micro-batches (fewer when
    there are fewer sequences), each in unit order: the prefill chunks first, then the
    decodes, in turn, so that each micro-batch holds near equal counts of each (what a
    cached plan's structure may depend on: the phases, not the token counts)."""
    n = min(parts, len(seqs))
    decoding = [unit.seqs[i].num_tokens == 1 and unit.seqs[i].start > 0 for i in seqs]
    order = ([i for i, d in zip(seqs, decoding) if not d]
             + [i for i, d in zip(seqs, decoding) if d])
    return [tuple(sorted(order[m::n])) for m in range(n)]


def compile(spec: ModelSpec, unit: Unit, placement: Placement,
                  cut: Cut = Cut()) -> Graph:
    if placement.num_experts != spec.moe.num_experts:
        raise GraphError(f"the placement covers {placement.num_experts} experts, "
                         f"the model has {spec.moe.num_experts}")
    homes = unit.homes(placement.devices)
    order = placement.dispatch_order()
    groups = {owner: split_groups(tuple(e for e in order if placement.owner(e) == owner),
                                  cut.expert_stages) for owner in placement.owners()}
    # per stage: each owner with a group in it, and that group
    stages = [[(owner, g[stage]) for owner, g in groups.items() if stage < len(g)]
              for stage in range(max(map(len, groups.values()), default=0))]
    # per micro-batch: the homes taking part, each with its sequences of it
    cuts = {h: cut_seqs(unit, unit.seqs_on(h), cut.micro_batches) for h in homes}
    b = _Builder()
    for m in range(cut.micro_batches):
        part = {h: c[m] for h, c in cuts.items() if m < len(c)}
        if part:
            _chain(b, spec, unit, cut, stages, m, part)
    return Graph(unit=unit, placement=placement, nodes=tuple(b.nodes), edges=tuple(b.edges),
                 num_layers=spec.num_layers)


def _chain(b: _Builder, spec: ModelSpec, unit: Unit, cut: Cut,
           stages: list[list[tuple[str, tuple[int, ...]]]], micro_batch: int,
           seqs: dict[str, tuple[int, ...]]) -> None:
    """One micro-batch's nodes, Embed to LMHead, over the sequences `seqs` of each home."""
    homes = tuple(seqs)
    tokens = {h: sum(unit.seqs[i].num_tokens for i in seqs[h]) for h in homes}
    context = {h: sum(unit.seqs[i].start + unit.seqs[i].num_tokens for i in seqs[h])
               for h in homes}
    prev = {h: b.add(Embed, device=h, seqs=seqs[h], num_tokens=tokens[h]) for h in homes}
    for layer, layer_spec in enumerate(spec.layers):
        attn = {h: b.add(Attention, prev[h], device=h, layer=layer, seqs=seqs[h],
                         num_tokens=tokens[h], num_context=context[h]) for h in homes}
        if cut.barrier and layer > 0:
            for h in homes:
                for other in homes:
                    if other != h:
                        b.edge(prev[other], attn[h], "control")
        if layer_spec.mlp == "dense":
            for h in homes:
                mlp = b.add(Expert, attn[h], device=h, layer=layer, kind="dense",
                            num_tokens=tokens[h], micro_batch=micro_batch)
                prev[h] = b.add(Combine, attn[h], mlp, device=h, layer=layer, seqs=seqs[h],
                                num_tokens=tokens[h])
            continue
        gate = {h: b.add(Gate, attn[h], device=h, layer=layer, seqs=seqs[h],
                         num_tokens=tokens[h]) for h in homes}
        partials: dict[str, list[int]] = {h: [] for h in homes}
        for stage, owned in enumerate(stages):
            dispatch: dict[str, int] = {}  # home -> its dispatch to the other owners
            for h in homes:
                others = [(owner, group) for owner, group in owned if owner != h]
                if others:
                    dispatch[h] = b.add(
                        Transfer, gate[h], src=h, dsts=tuple(o for o, _ in others),
                        layer=layer, payload="dispatch",
                        experts=tuple(e for _, group in others for e in group),
                        stage=stage, micro_batch=micro_batch)
            for owner, group in owned:
                sources = [gate[h] if h == owner else dispatch[h] for h in homes]
                expert = b.add(Expert, *sources, device=owner, layer=layer, experts=group,
                               stage=stage, micro_batch=micro_batch)
                others_home = tuple(h for h in homes if h != owner)
                back = (b.add(Transfer, expert, src=owner, dsts=others_home, layer=layer,
                              payload="combine", experts=group, stage=stage,
                              micro_batch=micro_batch)
                        if others_home else -1)
                for h in homes:
                    partials[h].append(expert if h == owner else back)
        for h in homes:
            shared = ([b.add(Expert, attn[h], device=h, layer=layer, kind="shared",
                             num_tokens=tokens[h], micro_batch=micro_batch)]
                      if spec.moe.shared_intermediate_size else [])
            prev[h] = b.add(Combine, attn[h], gate[h], *partials[h], *shared, device=h,
                            layer=layer, seqs=seqs[h], num_tokens=tokens[h])
    for h in homes:
        rows = sum(unit.seqs[i].num_logit_rows for i in seqs[h])
        b.add(LMHead, prev[h], device=h, seqs=seqs[h], num_rows=rows)
