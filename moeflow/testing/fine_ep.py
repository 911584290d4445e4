"""Invariant 6 (fine-ep), checked on a simulated run:

    - a delegated expert task runs on an actor that owns that expert;
    - no local task starts on an actor's stream while a delegated task is ready there;
    - one input never runs two layers at once;
    - actors may sit at different layers: there is no global barrier (every unit is one
      input, units never depend on each other, and no edge is a control edge).
"""

from __future__ import annotations

from typing import Any

from moeflow.dataflow.graph import Expert


def invariant_6(case: Any, result: Any) -> list[str]:
    from moeflow.scheduler.fine_ep import delegated

    out: list[str] = []
    start = {(ev.job, ev.node): ev.start for ev in result.trace}
    end = {(ev.job, ev.node): ev.end for ev in result.trace}
    resource = {(ev.job, ev.node): ev.resource for ev in result.trace}
    # event order, not time: a zero-duration node can finish at the very instant another
    # starts, yet after it
    ready_order = {(ev.job, ev.node): ev.ready_order for ev in result.trace}
    start_order = {(ev.job, ev.node): ev.start_order for ev in result.trace}
    kinds: dict[tuple[int, int], bool] = {}  # delegated?
    for j, job in enumerate(result.jobs):
        graph = job.plan.graph
        if len(graph.unit.seqs) != 1:
            out.append(f"invariant 6: unit {j} holds {len(graph.unit.seqs)} inputs, not one")
        if any(e.kind == "control" for e in graph.edges):
            out.append(f"invariant 6: unit {j} has control edges (a barrier)")
        layers: dict[int, list[tuple[float, float]]] = {}
        for node in graph.nodes:
            task = (j, node.id)
            if task not in start:
                continue
            kinds[task] = delegated(graph, node)
            if isinstance(node, Expert) and node.kind == "routed":
                for e in node.experts:
                    if graph.placement.owner(e) != node.device:
                        out.append(f"invariant 6: unit {j} computes expert {e} on "
                                   f"{node.device}, which does not own it")
            layer = getattr(node, "layer", None)
            if layer is not None:
                layers.setdefault(layer, []).append((start[task], end[task]))
        ordered = sorted((min(s for s, _ in v), max(e for _, e in v), layer)
                         for layer, v in layers.items())
        for (s0, e0, l0), (s1, _, l1) in zip(ordered, ordered[1:]):
            if s1 < e0 - 1e-12:
                out.append(f"invariant 6: unit {j} ran layers {l0} and {l1} at once "
                           f"({s1:.9f} < {e0:.9f})")
                break
    by_stream: dict[str, list[tuple[int, int]]] = {}
    for task in start:
        by_stream.setdefault(resource[task], []).append(task)
    for stream, tasks in by_stream.items():
        waiting = [(ready_order[t], start_order[t], t) for t in tasks if kinds[t]]
        for t in tasks:
            if kinds[t]:
                continue
            t0 = start_order[t]
            for r, s, d in waiting:
                if r < t0 < s:
                    out.append(f"invariant 6: on {stream}, local task {t} started (at "
                               f"{start[t]:.9f}) while delegated task {d} was ready")
                    break
            if len(out) > 5:
                return out
    return out
