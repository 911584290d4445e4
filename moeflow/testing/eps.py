"""Invariant 7 (eps), checked on a simulated run:

    - the expert groups are disjoint and cover all experts: in every MoE layer each routed
      expert is in exactly one group, on its owner; every owner's experts form the same
      number PN of equal groups (stages 0..PN-1), 1 <= PN <= E, PN dividing each owner's
      expert count;
    - each stage runs dispatch(p) -> GEMM(p) -> combine(p): every dispatch of a group ends
      before its GEMM starts, which ends before any of its combines starts (event times);
      and the plan issues, on each sender's stream, dispatch(p+1) before combine(p), so
      the dispatch of the next stage overlaps the GEMM of this one;
    - each (token, expert) pair is sent and returned exactly once: every home other than
      the owner has exactly one dispatch to and one combine from each group, carrying
      exactly that group's experts, and no transfer carries rows of no group (a dispatch
      or combine to several devices counts once for each);
    - PN = 1 below the enabling threshold: `enabling_rule(policy)`, which needs the
      policy's costs (`EPS.conformance_checks` adds it with the policy's own); and the
      same for micro-batches cut by rows (M > 1 only where the rule holds at N = M);
    - micro-batches (two-batch overlap) are each such a pipeline of their own, and each
      device issues micro-batch m+1's attention of a layer before micro-batch m's GEMMs
      of it, so that one micro-batch computes while the other's rows cross the links;
    - the kernel choice never changes results: not checked yet (eps has no kernel choice
      yet; invariant 5 compares its logits to the reference).

Groups, stages and transfers are matched by their fields (layer, devices, experts, stage,
micro-batch), not by the graph's edges, so a graph that lost an edge shows as a stage out of order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from moeflow.dataflow.graph import Attention, Expert, Gate, Graph, Transfer, dispatch_groups
from moeflow.scheduler.base import Cluster
from moeflow.scheduler.plan import InOrder, Plan

if TYPE_CHECKING:
    from moeflow.scheduler.eps import EPS

Check = Callable[[Any, Any], list[str]]  # (Case, SimResult) -> violations
_SLACK = 1e-12
# a dispatch or combine: layer, micro-batch, payload, src, dst, experts, stage
_Route = tuple[int, int, str, str, str, tuple[int, ...], int]


def routed_groups(graph: Graph) -> dict[tuple[int, int], list[Expert]]:
    """Per MoE layer and micro-batch, its routed Expert nodes (the groups)."""
    out: dict[tuple[int, int], list[Expert]] = {}
    for node in graph.nodes:
        if isinstance(node, Expert) and node.kind == "routed":
            out.setdefault((node.layer, node.micro_batch), []).append(node)
    return out


def num_stages(graph: Graph) -> int:
    """PN: the most groups one owner has in any layer and micro-batch (1 for a graph with
    no MoE layer)."""
    count: dict[tuple[int, int, str], int] = {}
    for (layer, m), groups in routed_groups(graph).items():
        for g in groups:
            count[(layer, m, g.device)] = count.get((layer, m, g.device), 0) + 1
    return max(count.values(), default=1)


def num_micro_batches(graph: Graph) -> int:
    """M: the chains a home's sequences are cut into (1 for a graph without)."""
    return graph.num_micro_batches


def homes_of(graph: Graph) -> dict[tuple[int, int], tuple[str, ...]]:
    """Per MoE layer and micro-batch, the homes whose gates route rows in it."""
    of_seq = graph.micro_batch_of_seq
    out: dict[tuple[int, int], list[str]] = {}
    for node in graph.nodes:
        if isinstance(node, Gate):
            out.setdefault((node.layer, of_seq[node.seqs[0]]), []).append(node.device)
    return {key: tuple(homes) for key, homes in out.items()}


def plan_problems(plan: Plan) -> list[str]:
    """Invariant 7's structure on one plan: the groups, the transfers, the issue order."""
    graph = plan.graph
    placement = graph.placement
    num_experts = placement.num_experts
    homes_at = homes_of(graph)
    out: list[str] = []
    transfers: dict[_Route, int] = {}
    for node, dst, experts in _routes(graph):
        route: _Route = (node.layer, node.micro_batch, node.payload, node.src, dst, experts,
                         node.stage)
        transfers[route] = transfers.get(route, 0) + 1
    matched: set[_Route] = set()
    pn = num_stages(graph)
    if not 1 <= pn <= num_experts:
        out.append(f"PN={pn} is outside 1..{num_experts}")
    for (layer, m), groups in sorted(routed_groups(graph).items()):
        at = _at(layer, m)
        seen: dict[int, int] = {}
        by_owner: dict[str, list[Expert]] = {}
        for g in groups:
            by_owner.setdefault(g.device, []).append(g)
            for e in g.experts:
                seen[e] = seen.get(e, 0) + 1
                if placement.owner(e) != g.device:
                    out.append(f"{at}: expert {e} is computed on {g.device}, which "
                               f"does not own it")
        twice = sorted(e for e, n in seen.items() if n > 1)
        if twice:
            out.append(f"{at}: groups overlap: experts {twice} are in more than "
                       f"one group")
        missing = sorted(set(range(num_experts)) - set(seen))
        if missing:
            out.append(f"{at}: experts {missing} are in no group")
        for owner, own in by_owner.items():
            count = len(placement.experts_of(owner))
            stages = sorted(g.stage for g in own)
            if len(own) != pn or stages != list(range(pn)):
                out.append(f"{at}: {owner} runs stages {stages}, not 0..{pn - 1}")
            if count % pn or any(len(g.experts) != count // pn for g in own):
                out.append(f"{at}: PN={pn} does not split {owner}'s {count} experts "
                           f"into equal groups ({[len(g.experts) for g in own]})")
            for g in own:
                for home in homes_at.get((layer, m), ()):
                    if home == owner:
                        continue
                    for payload, src, dst in (("dispatch", home, owner),
                                              ("combine", owner, home)):
                        route = (layer, m, payload, src, dst, g.experts, g.stage)
                        matched.add(route)
                        n = transfers.get(route, 0)
                        if n != 1:
                            out.append(f"{at}: {n} {payload} transfers {src}->{dst} "
                                       f"for stage {g.stage} (experts {list(g.experts)}), "
                                       f"not 1")
    for route in sorted(set(transfers) - matched):
        layer, m, payload, src, dst, experts, stage = route
        out.append(f"{_at(layer, m)}: a {payload} transfer {src}->{dst} of "
                   f"stage {stage} carries experts {list(experts)}, which are no group of a "
                   f"remote home's")
    out.extend(issue_problems(plan))
    return out


def issue_problems(plan: Plan) -> list[str]:
    """On each static stream: an owner's GEMMs of a micro-batch go in stage order; a sender
    issues dispatch(p+1) before combine(p) of the same layer and micro-batch; and a device
    issues micro-batch m+1's attention of a layer before micro-batch m's GEMMs of it."""
    graph = plan.graph
    of_seq = graph.micro_batch_of_seq
    out: list[str] = []
    for stream, rule in plan.rules:
        if not isinstance(rule, InOrder):
            continue
        gemms: dict[tuple[int, int], list[int]] = {}
        first_gemm: dict[tuple[int, int], int] = {}  # (layer, micro-batch) -> position
        attended: dict[tuple[int, int], int] = {}
        dispatched: dict[tuple[int, int, int], int] = {}  # (layer, m, stage) -> position
        combined: dict[tuple[int, int, int], int] = {}
        for pos, node_id in enumerate(rule.order):
            node = graph.nodes[node_id]
            if isinstance(node, Expert) and node.kind == "routed":
                gemms.setdefault((node.layer, node.micro_batch), []).append(node.stage)
                first_gemm.setdefault((node.layer, node.micro_batch), pos)
            elif isinstance(node, Attention):
                attended.setdefault((node.layer, of_seq[node.seqs[0]]), pos)
            elif isinstance(node, Transfer) and node.payload == "dispatch":
                dispatched.setdefault((node.layer, node.micro_batch, node.stage), pos)
            elif isinstance(node, Transfer) and node.payload == "combine":
                combined.setdefault((node.layer, node.micro_batch, node.stage), pos)
        for (layer, m), stages in gemms.items():
            if stages != sorted(stages):
                out.append(f"{stream} issues the GEMMs of {_at(layer, m)} in stage order "
                           f"{stages}")
        for (layer, m, stage), pos in sorted(combined.items()):
            following = dispatched.get((layer, m, stage + 1))
            if following is not None and following > pos:
                out.append(f"{stream} issues combine({stage}) of {_at(layer, m)} before "
                           f"dispatch({stage + 1}): the next dispatch cannot overlap "
                           f"GEMM({stage})")
        for (layer, m), pos in sorted(first_gemm.items()):
            later = attended.get((layer, m + 1))
            if later is not None and later > pos:
                out.append(f"{stream} issues the GEMMs of layer {layer} micro-batch {m} "
                           f"before micro-batch {m + 1}'s attention: nothing computes while "
                           f"micro-batch {m}'s rows cross the links")
    return out


def _at(layer: int, micro_batch: int) -> str:
    return f"layer {layer}" + (f" micro-batch {micro_batch}" if micro_batch else "")


def stage_order_problems(plan: Plan, start: dict[int, float], end: dict[int, float]
                         ) -> list[str]:
    """dispatch(p) -> GEMM(p) -> combine(p) in event times (`start`/`end` by node id)."""
    graph = plan.graph
    out: list[str] = []
    stage_of: dict[tuple[int, int, str, tuple[int, ...]], Expert] = {}
    for groups in routed_groups(graph).values():
        for g in groups:
            stage_of[(g.layer, g.micro_batch, g.device, g.experts)] = g
    for node, dst, experts in _routes(graph):
        owner = dst if node.payload == "dispatch" else node.src
        found = stage_of.get((node.layer, node.micro_batch, owner, experts))
        if found is None or node.id not in start or found.id not in start:
            continue
        g = found
        if node.payload == "dispatch" and end[node.id] > start[g.id] + _SLACK:
            out.append(f"layer {node.layer}: GEMM({g.stage}) on {owner} started at "
                       f"{start[g.id]:.9f}, before its dispatch from {node.src} ended "
                       f"({end[node.id]:.9f})")
        if node.payload == "combine" and start[node.id] < end[g.id] - _SLACK:
            out.append(f"layer {node.layer}: combine({g.stage}) {owner}->{dst} started "
                       f"at {start[node.id]:.9f}, before its GEMM ended ({end[g.id]:.9f})")
    return out


def _routes(graph: Graph) -> list[tuple[Transfer, str, tuple[int, ...]]]:
    """Every dispatch and combine, by destination: (the transfer, a destination, the
    experts whose rows it takes there)."""
    out = []
    for node in graph.nodes:
        if isinstance(node, Transfer) and node.payload == "dispatch":
            out.extend((node, dst, group) for dst, group in
                       zip(node.dsts, dispatch_groups(node, graph.placement)))
        elif isinstance(node, Transfer) and node.payload == "combine":
            out.extend((node, dst, node.experts) for dst in node.dsts)
    return out


def invariant_7(case: Any, result: Any) -> list[str]:
    """Invariant 7 on a simulated run, but for the enabling rule (see `enabling_rule`)."""
    out: list[str] = []
    start: dict[int, dict[int, float]] = {}
    end: dict[int, dict[int, float]] = {}
    for ev in result.trace:
        start.setdefault(ev.job, {})[ev.node] = ev.start
        end.setdefault(ev.job, {})[ev.node] = ev.end
    for j, job in enumerate(result.jobs):
        found = plan_problems(job.plan) + stage_order_problems(
            job.plan, start.get(j, {}), end.get(j, {}))
        out.extend(f"invariant 7: unit {j}: {p}" for p in found)
        if len(out) > 5:
            break
    return out


def enabling_rule(policy: EPS) -> Check:
    """Invariant 7's last part for `policy`: every unit runs the PN and M the policy chose
    for it, and PN > 1 (M > 1) only where the enabling rule holds at the unit's own token
    count for its experts (its rows) cut in PN (M) (with a fixed `stages` or
    `micro_batches`, which overrides the rule, only the first)."""

    def check(case: Any, result: Any) -> list[str]:
        spec = case.model.spec
        placement = case.cluster.placement
        cluster = Cluster(placement.devices, placement)
        costs = policy.stage_costs(spec)
        out: list[str] = []
        for j, job in enumerate(result.jobs):
            if not routed_groups(job.plan.graph):
                continue  # no MoE layer: nothing was cut
            pn = num_stages(job.plan.graph)
            m = num_micro_batches(job.plan.graph)
            chosen = policy.choice(job.unit, spec, cluster)
            if (pn, m) != (chosen.stages, chosen.micro_batches):
                out.append(f"invariant 7: unit {j} of {job.unit.num_tokens} tokens runs "
                           f"PN={pn}, M={m}, the policy chose {chosen.stages}, "
                           f"{chosen.micro_batches}")
            if policy.stages is None and policy.micro_batches is None and m > 1:
                load = policy.load(job.unit, spec, cluster, job.unit.num_tokens)
                comm, gemm = load.row_ratios(costs, m)
                if comm > 1 + policy.eps0 or gemm > 1 + policy.eps1:
                    out.append(f"invariant 7: unit {j} runs M={m} micro-batches below the "
                               f"enabling threshold: N·S(m/N)/S(m) = {comm:.3f}, "
                               f"N·G(m/N,E)/G(m,E) = {gemm:.3f}")
            if policy.stages is None and pn > 1:  # judged at a micro-batch's tokens
                load = policy.load(job.unit, spec, cluster, job.unit.num_tokens // m)
                comm, gemm = load.ratios(costs, pn)
                if comm > 1 + policy.eps0 or gemm > 1 + policy.eps1:
                    out.append(f"invariant 7: unit {j} runs PN={pn} below the enabling "
                               f"threshold: N·S(m/N)/S(m) = {comm:.3f} (<= "
                               f"{1 + policy.eps0}), N·G(m/N,E/N)/G(m,E) = {gemm:.3f} "
                               f"(<= {1 + policy.eps1})")
            if len(out) > 5:
                break
        return out

    return check
