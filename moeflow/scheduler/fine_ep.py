"""fine-ep: fine-grained expert parallelism, for tail latency in online serving.

This is moeflow's own specification, inspired by the abstract of "Fine-grained expert
parallelism-based scheduling for MoE model serving" (KAIST thesis, 2023; its full text is
not public) and by related work (Lina, AMoE, ExFlow):

- The unit is one input: each request's next forward pass (a prefill chunk, or one decode
  token) is its own unit, homed on one device (where its attention and KV cache live;
  new requests go to the device with the most free KV cache).
- At an MoE layer, the rows that need a remote expert go point to point to the expert's
  owner as a delegated expert task (one dispatch from the home, a message to each owner);
  the owner computes it and returns the outputs, and the home combines them. No collectives, no global barrier: units are independent, so
  actors may sit at different layers.
- Layer-wise overlap: while an input waits for remote results at layer l, its actor runs
  other inputs' ready work.
- Delegated-first: on every actor, ready delegated tasks (another input's critical path)
  go before local work. Serving delegated work even while local inputs are blocked also
  rules out cyclic waits.
- Within each class, the shallowest layer first, then earliest-arrival-first: the node
  that became ready first (nodes ready at once in admission order, which is arrival order
  since admission is first come, first served). Shallowest-first lets an input that fell
  behind catch up, so inputs meet at the same layer and coalesce (below); with arrival
  order alone they drift apart and each reads the weights on its own. It starves no one:
  an input's next node waits only for nodes above it or ready before it, and those
  finish. The price: a new prompt's early layers go before running decodes' deeper ones.
  (Preferring decodes to prefills outright starves a prompt under steady decodes: the
  conformance suite finds that livelock.) A one-token chunk counts as a decode.
- Coalescing: an actor runs ready nodes that share weights (the same layer's attention,
  router, expert group or LM head) of different inputs in the same phase (prefill or
  decode) as one kernel, so weights stream once for all of them. Transfers of one layer
  to the same peer go out together, so the tasks they feed there coalesce too. Groups
  form from what is ready when the actor frees up: small at light load, larger under
  load, but never a whole batch's worth as a barrier would gather. Embedding gathers and
  combines share no weights, but one op over a group costs little more than one over one
  input, so they coalesce by layer too. An expert group's local tasks ride with its
  delegated ones only when no other delegated task waits there (the semantics never lets
  a group's member pass a ready node that ranks before it), so delegated-first holds and
  the weights still stream once. A prefill never
  merges with decodes, so running requests' tokens do not move at a long prompt's pace.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from moeflow.dataflow.compiler import compile
from moeflow.dataflow.graph import (
    Attention, Combine, Embed, Expert, Gate, Graph, LMHead, Node, Transfer, Unit,
)
from moeflow.models.spec import ModelSpec
from moeflow.scheduler.base import Budget, Cluster, RequestView, Scheduler, unit_shape
from moeflow.scheduler.batch_ep import advance
from moeflow.scheduler.plan import ByPriority, MergeKey, Plan, node_stream


class FineEP(Scheduler):
    name = "fine-ep"

    def form_units(self, waiting: Sequence[RequestView], running: Sequence[RequestView],
                   budget: Budget) -> list[Unit]:
        free = dict(budget.free_kv_blocks)
        tokens_left, seqs_left = budget.max_tokens, budget.max_seqs
        units: list[Unit] = []
        for r in running:  # in admission order
            if tokens_left <= 0 or seqs_left <= 0:
                break
            chunk = advance(r, r.home, tokens_left, free, budget.kv_block_size)
            if chunk is not None:
                units.append(Unit((chunk,)))
                tokens_left -= chunk.num_tokens
                seqs_left -= 1
        for r in waiting:
            if tokens_left <= 0 or seqs_left <= 0 or not free:
                break
            home = max(free, key=lambda d: free[d])
            chunk = advance(r, home, tokens_left, free, budget.kv_block_size)
            if chunk is None:
                break  # first come, first served
            units.append(Unit((chunk,)))
            tokens_left -= chunk.num_tokens
            seqs_left -= 1
        return units

    def plan_key(self, unit: Unit) -> Hashable:
        return unit_shape(unit)  # the graph's structure; token counts are bound per step

    def plan(self, unit: Unit, model: ModelSpec, cluster: Cluster) -> Plan:
        graph = compile(model, unit, cluster.placement)
        [chunk] = unit.seqs
        phase = "prefill" if chunk.num_tokens > 1 else "decode"  # one token: a decode step
        assignment = tuple(node_stream(graph, i) for i in range(len(graph.nodes)))
        priority = tuple((0.0 if delegated(graph, n) else 1.0, depth(graph, n))
                         for n in graph.nodes)
        merge = tuple(merge_key(n, phase, delegated(graph, n)) for n in graph.nodes)
        rules = tuple((s, ByPriority(coalesce=True, fifo=True)) for s in sorted(set(assignment)))
        return Plan(graph, assignment, rules, priority, merge)


def depth(graph: Graph, node: Node) -> float:
    """How far into the forward pass a node is: its layer (the embedding before layer 0,
    the LM head after the last)."""
    if isinstance(node, Embed):
        return -1.0
    if isinstance(node, LMHead):
        return float(graph.num_layers)
    return float(node.layer)


def home_of(graph: Graph) -> str:
    return graph.unit.seqs[0].home


def delegated(graph: Graph, node: Node) -> bool:
    """A delegated expert task: routed experts computed for the input by another actor,
    and the transfer that returns their outputs."""
    home = home_of(graph)
    if isinstance(node, Expert):
        return node.kind == "routed" and node.device != home
    if isinstance(node, Transfer):
        return node.payload == "combine" and node.src != home
    return False


def merge_key(node: Node, phase: str, is_delegated: bool) -> MergeKey:
    """Nodes with equal keys on one stream share their weights (or, for transfers, their
    link and destination) and may run as one group.
    An expert group's local and delegated tasks share a key, so its weights stream once for
    both. Delegated-first holds all the same: the semantics lets a local task join a
    delegated one's group only when no ready node left out ranks before it, that is, when
    no other delegated task waits on the stream."""
    role = "delegated" if is_delegated else "local"
    if isinstance(node, Attention):
        return ("attention", node.layer, node.part, phase)
    if isinstance(node, Gate):
        return ("gate", node.layer, phase)
    if isinstance(node, Expert):
        if node.kind == "routed":
            return ("experts", node.layer, node.experts[0], node.experts[-1], phase)
        return (node.kind, node.layer, phase)
    if isinstance(node, LMHead):
        return ("lm_head", phase)
    if isinstance(node, Transfer):  # sent together, they reach the peer together and the
        # tasks they feed there coalesce too
        return ("transfer", node.src, *node.dsts, node.layer, node.payload, phase, role)
    if isinstance(node, Embed):  # no weights shared, but one gather for all beats many
        return ("embed", phase)
    if isinstance(node, Combine):
        return ("combine", node.layer, phase)
    return None
