"""`compile_offload`: the graph of a forward pass on a GPU too small for the weights.

A `gpu` device runs the model; a `host` (its CPU) holds the routed experts the GPU does not
own and, with CPU attention, the KV cache. The unit's sequences are all homed on the GPU
(embedding, projections, router, experts, LM head and sampling run there) and cut into
micro-batches, each its own chain of nodes, so that one micro-batch's GPU work overlaps
another's CPU attention and transfers (MoE-Lightning's CGOPipe, arXiv 2411.11217):

    Embed(j) -> per layer i:
        Attention(pre, gpu)            input norm, QKV, q/k norms, RoPE
        Transfer(qkv, gpu->host)       q, k, v of the micro-batch's new tokens
        Attention(core, host)          KV-cache write and attention over the cached keys
        Transfer(hidden, host->gpu)    the attention output
        Attention(post, gpu)           output projection, residual, post-attention norm
        Gate -> Expert(routed, every expert) [-> Expert(shared)] -> Combine
    -> LMHead(j)

A micro-batch of whole fresh prompts (each sequence from position 0) is a prefill: its
attention runs on the GPU over the prompts' own keys, and only the keys and values go to
the host's cache (the host attending a long prompt would be the slowest step of all):

        Attention(prefill, gpu)        the whole attention, keeping no cache
        Transfer(kv, gpu->host)        the new tokens' keys and values
        Attention(store, host)         written into the host's KV cache
        (the GPU's chain goes on from the prefill part: Gate -> ...)

With `cpu_attention=False` (FlexGen's schedule) attention stays whole on the GPU, with the
KV cache there.

Weights. The experts the placement gives the GPU are resident. Every other owner's experts
of a layer are cut into `pages` pages of near-equal size, each a `Transfer(weights,
owner->gpu, experts=..., stage=p, part=...)`: contiguous groups of whole experts while the
owner has at least as many experts as pages, else every expert cut along its FFN's
intermediate width, page k holding slice k of `pages` of each (`part=(k, pages)`; see
`page_columns`). Every routed Expert of the layer reads all of them, so the layer's
weights are in place before any of its micro-batches runs its experts. Pages land in a
double buffer of two layers, used by MoE-layer parity: a page of an MoE layer may
overwrite its half only after every Expert of the MoE layer two before it is done (a `war`
edge from each of them), so at most two layers' pages are on the GPU at once. The first
two MoE layers' pages wait (a `control` edge) for the GPU's first Embed: a peer holds
messages for a unit it has not started only up to a size.

The pinned relay (CPU -> pinned -> GPU, as the paper moves weights): a page is first copied,
on its owner, into one of `relay_slots` pinned slots (`Transfer(pin, owner->owner)`, the
owner's `pin` stream), and the copy to the GPU (`Transfer(weights)`) reads it from there.
Pages take the slots in turn, in layer order: a page's pin waits (a `war` edge) for the
copy to the GPU of the page `relay_slots` before it, the slot's last user.

The micro-batches and the order streams issue their nodes in are the policy's
(`moeflow.scheduler.cgopipe`); this module only builds the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeflow.dataflow.compiler import _Builder, split_groups
from moeflow.dataflow.graph import (
    Attention, Combine, Embed, Expert, Gate, Graph, GraphError, LMHead, Placement, Transfer, Unit,
)
from moeflow.models.spec import DTYPE_BYTES, ModelSpec


RELAY_SLOTS = 2  # pinned slots: a page is copied into one while the one before crosses


@dataclass(frozen=True, slots=True)
class OffloadCut:
    """gpu, host         the device that runs the model and the one that holds what the
                         GPU cannot (they may be the same: nothing then moves)
    micro_batches        the unit's sequence indices, cut into micro-batches (each one in
                         unit order); together they hold every sequence once
    cpu_attention        attention's core on the host over a host KV cache (CGOPipe), or
                         all of attention on the GPU (FlexGen)
    pages                weight pages per offloading owner and layer (`offloaded_pages`)
    relay_slots          pinned slots of the relay each page passes through"""

    gpu: str
    host: str
    micro_batches: tuple[tuple[int, ...], ...]
    cpu_attention: bool = True
    pages: int = 1
    relay_slots: int = RELAY_SLOTS

    def __post_init__(self) -> None:
        if not self.micro_batches or any(not mb for mb in self.micro_batches):
            raise GraphError("micro-batches must be non-empty, and at least one")
        if self.pages < 1:
            raise GraphError(f"pages must be >= 1, got {self.pages}")
        if self.relay_slots < 1:
            raise GraphError(f"relay_slots must be >= 1, got {self.relay_slots}")


@dataclass(frozen=True, slots=True)
class OffloadNodes:
    """Where compile_offload put each micro-batch's nodes, by (layer, micro-batch): what a
    policy needs to lay out its issue order without searching the graph."""

    embed: tuple[int, ...]  # per micro-batch
    pre: tuple[tuple[int, ...], ...]  # [layer][micro-batch]: Attention pre (full without
    # CPU attention, prefill for a micro-batch of fresh prompts)
    qkv: tuple[tuple[int, ...], ...]  # Transfer(qkv) (a prefill's: kv), or -1 without CPU
    # attention
    core: tuple[tuple[int, ...], ...]  # Attention core (a prefill's: store), or -1
    back: tuple[tuple[int, ...], ...]  # Transfer(hidden), or -1 (without CPU attention, or
    # for a prefill)
    post: tuple[tuple[tuple[int, ...], ...], ...]  # [layer][micro-batch]: post, gate,
    # experts, combine (what runs on the GPU after attention)
    pages: tuple[tuple[int, ...], ...]  # [layer]: its weight pages, in load order
    head: tuple[int, ...]  # LMHead per micro-batch


Page = tuple[str, tuple[int, ...], tuple[int, int]]  # owner, experts, part (k, n)


def offloaded_pages(placement: Placement, gpu: str, pages: int, width: int) -> list[Page]:
    """A layer's weight pages, `pages` per owner but the GPU: (owner, experts, part). An
    owner with at least `pages` experts sends contiguous groups of whole experts (part
    (0, 1)); one with fewer sends every expert in each page, page k holding slice k of
    `pages` of each one's intermediate width `width` (no more slices than columns)."""
    out: list[Page] = []
    for owner in placement.owners():
        if owner == gpu:
            continue
        experts = placement.experts_of(owner)
        if len(experts) >= pages:
            out.extend((owner, group, (0, 1)) for group in split_groups(experts, pages))
        else:
            n = max(1, min(pages, width))
            out.extend((owner, experts, (k, n)) for k in range(n))
    return out


def page_columns(part: tuple[int, int], width: int) -> tuple[int, int]:
    """The columns [start, end) of an expert's intermediate width (its gate and up rows,
    its down columns) that part (k, n) of it holds: near-equal, contiguous, in order."""
    k, n = part
    return width * k // n, width * (k + 1) // n


def compile_offload(spec: ModelSpec, unit: Unit, placement: Placement,
                    cut: OffloadCut) -> tuple[Graph, OffloadNodes]:
    if placement.num_experts != spec.moe.num_experts:
        raise GraphError(f"the placement covers {placement.num_experts} experts, "
                         f"the model has {spec.moe.num_experts}")
    gpu, host = cut.gpu, cut.host
    for device in (gpu, host):
        if device not in placement.devices:
            raise GraphError(f"{device} is not in the placement's devices {placement.devices}")
    if unit.homes(placement.devices) != (gpu,):
        raise GraphError(f"an offloaded unit homes every sequence on the GPU {gpu}; this one "
                         f"homes them on {unit.homes(placement.devices)}")
    listed = sorted(i for mb in cut.micro_batches for i in mb)
    if listed != list(range(len(unit.seqs))):
        raise GraphError(f"the micro-batches {cut.micro_batches} do not hold each of the "
                         f"unit's {len(unit.seqs)} sequences exactly once")
    split = cut.cpu_attention and host != gpu
    everything = placement.dispatch_order()
    page_list = offloaded_pages(placement, gpu, cut.pages, spec.moe.intermediate_size)

    a = spec.attention
    act = DTYPE_BYTES.get(spec.dtype, 2)  # activations stay in the model's dtype
    qkv_row, out_row, kv_row = ((a.q_width + 2 * a.kv_width) * act, a.o_width * act,
                                2 * a.kv_width * act)
    b = _Builder()
    tokens = [sum(unit.seqs[i].num_tokens for i in mb) for mb in cut.micro_batches]
    context = [sum(unit.seqs[i].start + unit.seqs[i].num_tokens for i in mb)
               for mb in cut.micro_batches]
    embed = tuple(b.add(Embed, device=gpu, seqs=mb, num_tokens=t)
                  for mb, t in zip(cut.micro_batches, tokens))
    prev = list(embed)
    # per layer, per micro-batch: its attention parts (-1 where attention is whole), the
    # GPU's chain after attention; per layer, its pages and its routed experts
    pre: list[list[int]] = []
    qkv: list[list[int]] = []
    core: list[list[int]] = []
    back: list[list[int]] = []
    post: list[list[tuple[int, ...]]] = []
    pages: list[tuple[int, ...]] = []
    routed: list[list[int]] = []
    moe_routed: list[list[int]] = []  # per MoE layer in order: its routed experts
    sent_pages: list[int] = []  # every page's copy to the GPU, in order: the relay's users
    for layer, layer_spec in enumerate(spec.layers):
        layer_pages: list[int] = []
        if layer_spec.mlp != "dense":
            for p, (owner, group, part) in enumerate(page_list):
                pinned = b.add(Transfer, src=owner, dsts=(owner,), layer=layer, payload="pin",
                               experts=group, stage=p, part=part)
                if len(sent_pages) >= cut.relay_slots:  # its slot's last page has gone
                    b.edge(sent_pages[-cut.relay_slots], pinned, "war")
                page = b.add(Transfer, pinned, src=owner, dsts=(gpu,), layer=layer,
                             payload="weights", experts=group, stage=p, part=part)
                sent_pages.append(page)
                if len(moe_routed) >= 2:  # its buffer half held the MoE layer two back's
                    for expert in moe_routed[-2]:
                        b.edge(expert, page, "war")
                else:  # the first pages go once the GPU has the unit (a peer holds
                    b.edge(embed[0], page, "control")  # early messages only so long)
                layer_pages.append(page)
        pages.append(tuple(layer_pages))
        for ids in (pre, qkv, core, back, post, routed):
            ids.append([])
        for j, mb in enumerate(cut.micro_batches):
            common = dict(layer=layer, seqs=mb, num_tokens=tokens[j])
            chain: list[int] = []
            if split and all(unit.seqs[i].start == 0 for i in mb):  # prefill on the GPU
                first = last = b.add(Attention, prev[j], device=gpu, num_context=context[j],
                                     part="prefill", **common)
                sent = b.add(Transfer, first, src=gpu, dsts=(host,), layer=layer, payload="kv",
                             num_bytes=tokens[j] * kv_row)
                attended = b.add(Attention, sent, device=host, num_context=context[j],
                                 part="store", **common)
                returned = -1
            elif split:
                first = b.add(Attention, prev[j], device=gpu, num_context=context[j],
                              part="pre", **common)
                sent = b.add(Transfer, first, src=gpu, dsts=(host,), layer=layer, payload="qkv",
                             num_bytes=tokens[j] * qkv_row)
                attended = b.add(Attention, sent, device=host, num_context=context[j],
                                 part="core", **common)
                returned = b.add(Transfer, attended, src=host, dsts=(gpu,), layer=layer,
                                 payload="hidden", num_bytes=tokens[j] * out_row)
                last = b.add(Attention, returned, first, device=gpu, num_context=context[j],
                             part="post", **common)
                chain.append(last)
            else:
                first = last = b.add(Attention, prev[j], device=gpu, num_context=context[j],
                                     **common)
                sent = attended = returned = -1
            if layer_spec.mlp == "dense":
                mlp = b.add(Expert, last, device=gpu, layer=layer, kind="dense",
                            num_tokens=tokens[j], micro_batch=j)
                combine = b.add(Combine, last, mlp, device=gpu, **common)
                chain += [mlp, combine]
            else:
                gate = b.add(Gate, last, device=gpu, **common)
                expert = b.add(Expert, gate, *layer_pages, device=gpu, layer=layer,
                               experts=everything, micro_batch=j)
                routed[layer].append(expert)
                shared = ([b.add(Expert, last, device=gpu, layer=layer, kind="shared",
                                 num_tokens=tokens[j], micro_batch=j)]
                          if spec.moe.shared_intermediate_size else [])
                combine = b.add(Combine, last, gate, expert, *shared, device=gpu, **common)
                chain += [gate, expert, *shared, combine]
            prev[j] = combine
            pre[layer].append(first)
            qkv[layer].append(sent)
            core[layer].append(attended)
            back[layer].append(returned)
            post[layer].append(tuple(chain))
        if layer_spec.mlp != "dense":
            moe_routed.append(routed[layer])
    head = tuple(b.add(LMHead, prev[j], device=gpu, seqs=mb,
                       num_rows=sum(unit.seqs[i].num_logit_rows for i in mb))
                 for j, mb in enumerate(cut.micro_batches))
    graph = Graph(unit=unit, placement=placement, nodes=tuple(b.nodes), edges=tuple(b.edges),
                  num_layers=spec.num_layers)

    def rows(ids: list[list[int]]) -> tuple[tuple[int, ...], ...]:
        return tuple(map(tuple, ids))

    return graph, OffloadNodes(embed, rows(pre), rows(qkv), rows(core), rows(back),
                               tuple(tuple(layer) for layer in post), tuple(pages), head)
