"""Invariant 8 (cgopipe, and flexgen where it applies), checked on a simulated run:

    - each micro-batch follows PreAttn -> QKV to the host -> CPU attention -> hidden back
      -> PostAttn: in every layer, each part of a micro-batch's attention ends before the
      next starts (event times); a micro-batch of fresh prompts follows prefill on the GPU
      -> its keys and values to the host -> stored in the host's cache;
    - every weight page of layer i is resident before the layer's experts run: every page
      ends before any routed Expert of layer i starts (PostAttn of the paper holds the MoE
      FFN; here the router and the experts are nodes of their own, after the O-projection);
    - a double-buffer half is overwritten only after the layer that used it is done: a page
      of an MoE layer starts only after every routed Expert of the MoE layer two before it
      ended (dense layers have no pages); so the GPU never holds more than two layers'
      pages;
    - the pages tile the layer's offloaded experts exactly: in every MoE layer the pages hold
      each expert the GPU does not own once (whole, or every slice k of n of it once), and
      no other.

    - a pinned slot is refilled only after its previous GPU copy finished: on each owner,
      pages pass through its relay of `RELAY_SLOTS` slots in order (layer, then page), and
      the copy into the relay of page k starts only after the copy to the GPU of page
      k - RELAY_SLOTS ended (so the relay never holds more than its slots); every page
      sent to the GPU comes from such a copy of itself.

Nodes are matched by their fields (layer, part, seqs, payload, experts), not by the graph's
edges, so a graph that lost an edge shows as an event out of order.
"""

from __future__ import annotations

from typing import Any

from moeflow.dataflow.graph import Attention, Expert, Graph, Transfer
from moeflow.dataflow.offload import RELAY_SLOTS

_SLACK = 1e-12
_PARTS = ("pre", "qkv", "core", "hidden", "post")
_PREFILL_PARTS = ("prefill", "kv", "store")


def graph_problems(graph: Graph, gpu: str) -> list[str]:
    """The pages of every MoE layer tile its offloaded experts exactly."""
    out: list[str] = []
    offloaded = {e for e in range(graph.placement.num_experts)
                 if graph.placement.owner(e) != gpu}
    pages: dict[int, dict[int, list[tuple[int, int]]]] = {}  # layer -> expert -> its parts
    moe_layers = {n.layer for n in graph.nodes if isinstance(n, Expert) and n.kind == "routed"}
    for node in graph.nodes:
        if isinstance(node, Transfer) and node.payload == "weights":
            if node.dst != gpu:
                out.append(f"a weight page of layer {node.layer} goes to {node.dst}, "
                           f"not the GPU {gpu}")
            held = pages.setdefault(node.layer, {})
            for e in node.experts:
                held.setdefault(e, []).append(node.part)
    for layer in sorted(moe_layers | set(pages)):
        held = pages.get(layer, {})
        if sorted(held) != sorted(offloaded):
            out.append(f"layer {layer}: the pages hold experts {sorted(held)[:8]}, the GPU "
                       f"does not own {sorted(offloaded)[:8]}")
        for e, parts in sorted(held.items()):
            n = parts[0][1]
            if sorted(parts) != [(k, n) for k in range(n)]:
                out.append(f"layer {layer}: the pages hold parts {sorted(parts)[:8]} of "
                           f"expert {e}, not each of its {n} once")
    return out


def invariant_8(case: Any, result: Any) -> list[str]:
    out: list[str] = []
    events: dict[tuple[int, int], tuple[float, float]] = {
        (ev.job, ev.node): (ev.start, ev.end) for ev in result.trace}
    for j, job in enumerate(result.jobs):
        graph = job.plan.graph
        gpu = job.plan.assignment[0].actor  # the first node, an Embed, runs on the GPU
        out.extend(f"unit {j}: {p}" for p in graph_problems(graph, gpu))
        out.extend(f"unit {j}: {p}" for p in relay_problems(graph, events, j))
        parts: dict[tuple[int, tuple[int, ...]], dict[str, list[int]]] = {}
        pages: dict[int, list[int]] = {}
        experts: dict[int, list[int]] = {}
        for node in graph.nodes:
            if isinstance(node, Attention) and node.part != "full":
                name = node.part
            elif isinstance(node, Transfer) and node.payload in ("qkv", "hidden", "kv"):
                name = node.payload
            elif isinstance(node, Transfer) and node.payload == "weights":
                pages.setdefault(node.layer, []).append(node.id)
                continue
            elif isinstance(node, Expert) and node.kind == "routed":
                experts.setdefault(node.layer, []).append(node.id)
                continue
            else:
                continue
            seqs = _seqs_of(graph, node.id)
            parts.setdefault((node.layer, seqs), {}).setdefault(name, []).append(node.id)
        for (layer, seqs), found in sorted(parts.items()):
            names = _PREFILL_PARTS if "prefill" in found else _PARTS
            chain = [found.get(p, []) for p in names]
            if any(len(c) != 1 for c in chain) or len(found) != len(names):
                out.append(f"unit {j} layer {layer} micro-batch {seqs}: attention parts "
                           f"{ {p: len(c) for p, c in found.items()} }, one of each of "
                           f"{', '.join(names)} expected")
                continue
            for (a, na), (b, nb) in zip(zip(names, chain), zip(names[1:], chain[1:])):
                if events[(j, na[0])][1] > events[(j, nb[0])][0] + _SLACK:
                    out.append(f"unit {j} layer {layer} micro-batch {seqs}: {b} started "
                               f"before {a} ended")
        for layer, ids in pages.items():
            first_expert = min((events[(j, e)][0] for e in experts.get(layer, [])),
                               default=float("inf"))
            last_page = max(events[(j, p)][1] for p in ids)
            if last_page > first_expert + _SLACK:
                out.append(f"unit {j} layer {layer}: an expert ran before the layer's last "
                           f"weight page arrived")
            moe = sorted(experts)
            at = moe.index(layer) if layer in moe else -1
            if at >= 2:  # the buffer half of the MoE layer two before
                freed = max(events[(j, e)][1] for e in experts[moe[at - 2]])
                first_page = min(events[(j, p)][0] for p in ids)
                if first_page < freed - _SLACK:
                    out.append(f"unit {j} layer {layer}: a page overwrote its buffer half "
                               f"before layer {moe[at - 2]}'s experts were done")
    return out[:20]


def relay_problems(graph: Graph, events: dict[tuple[int, int], tuple[float, float]],
                   job: int) -> list[str]:
    """The pinned relay (see the module docstring), in event times of unit `job`."""
    out: list[str] = []
    sent: dict[str, list[Transfer]] = {}  # owner -> its pages to the GPU, in relay order
    for node in graph.nodes:
        if isinstance(node, Transfer) and node.payload == "weights":
            sent.setdefault(node.src, []).append(node)
            pins = [graph.nodes[p] for p in graph.inputs(node.id)]
            if [(p.payload, p.src, p.dsts, p.layer, p.experts, p.part)  # type: ignore
                    for p in pins] != [("pin", node.src, (node.src,), node.layer,
                                        node.experts, node.part)]:
                out.append(f"layer {node.layer}: page {node.stage} to the GPU does not come "
                           f"from its copy in the pinned relay")
    for owner, pages in sent.items():
        pages.sort(key=lambda n: (n.layer, n.stage))
        for k in range(RELAY_SLOTS, len(pages)):
            pins = graph.inputs(pages[k].id)
            gone = events.get((job, pages[k - RELAY_SLOTS].id))
            refill = events.get((job, pins[0])) if pins else None
            if gone is not None and refill is not None and refill[0] < gone[1] - _SLACK:
                out.append(f"{owner}: layer {pages[k].layer} page {pages[k].stage} was copied "
                           f"into its pinned slot before layer {pages[k - RELAY_SLOTS].layer} "
                           f"page {pages[k - RELAY_SLOTS].stage} had left it for the GPU")
    return out


def _seqs_of(graph: Graph, node_id: int) -> tuple[int, ...]:
    """A node's micro-batch: its own `seqs`, or a transfer's source's."""
    for _ in range(4):
        node = graph.nodes[node_id]
        seqs = getattr(node, "seqs", None)
        if seqs is not None:
            return seqs  # type: ignore[no-any-return]
        node_id = graph.inputs(node_id)[0]
    return ()


__all__ = ["graph_problems", "invariant_8", "relay_problems"]
