"""Each node kind, declared in one place.

A node kind is its fields (a frozen dataclass in `moeflow.dataflow.graph`) and a `NodeKind`
in `KINDS`, which says everything else the layers ask of it:

    roles, role   its inputs, by role: what each role takes (how many), and the role a
                  producer's value fills. `graph.input_roles` and `input_role` read them,
                  `check.problems` refuses a node whose inputs do not fill its roles, and
                  the worker reads its inputs by role, never by edge order.
    sizes, bind   the sizes `compile` gives it, and the node bound to another unit's
                  sequences (a cached plan replayed for a unit of its shape: the simulator).
    cost          the `moeflow.sim.cost.CostModel` method that sizes its work (FLOPs, bytes
                  of weights and activations, rows sharing a weight), which the roofline of
                  its device prices; `launches`, the kernels it takes.
    output_bytes  its memory effect: the bytes its value holds on its device until its
                  consumers have read it (the simulator's memory budgets, invariant 3).
    op            the `moeflow.actors.worker.DeviceWorker` method that runs a group of them
                  (nodes of several units as one kernel); the null worker runs every kind
                  instantly.
    travels       for a Transfer, the codec each payload's value crosses to another device
                  in (`moeflow.actors.values.TRAVELS`; "tensor": a plain tensor); an actor
                  fails the unit of a transfer whose value is of another.

A new kind adds its dataclass to `graph` and its NodeKind here; the cost and op it names
are written where they run. tests/unit/test_kinds.py checks that every kind is declared,
that what each one names exists, and that its codecs are known.

Inputs by role, per kind (and attention part, expert kind or payload): role -> (fewest,
most) inputs it takes (most: None for any number):

    Attention full, pre,    hidden: Embed or Combine (the layer's input)
      prefill
    Attention core          qkv: the Transfer(qkv) of its pre part
    Attention post          core: the Transfer(hidden) back from the core;
                            pre: its pre part (the residual)
    Attention store         kv: the Transfer(kv) of a prefill part
    Gate                    attn: Attention (full, post or prefill)
    Expert routed           rows: Gate (its own device's) or Transfer(dispatch), one per home;
                            pages: Transfer(weights), experts it does not hold
    Expert shared, dense    attn: Attention (full, post or prefill)
    Transfer dispatch       routing: Gate;  combine: out: routed Expert
    Transfer qkv            pre: Attention(pre);  hidden: core: Attention(core)
    Transfer kv             attn: Attention(prefill), the keys and values it made
    Transfer pin            (nothing: a page of weights held at its source, copied into a
                            pinned relay slot there)
    Transfer weights        pinned: the Transfer(pin) of its page
    Combine                 attn: Attention (the residual); routing: Gate (the row order, in
                            an MoE layer); partials: routed Expert or Transfer(combine);
                            mlp: shared or dense Expert
    LMHead                  hidden: Combine
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from typing import TYPE_CHECKING, Any

from moeflow.dataflow.graph import (
    NODE_KINDS, Arity, Attention, Combine, Embed, Expert, Gate, LMHead, Node, Role, Transfer,
    Unit,
)

if TYPE_CHECKING:
    from moeflow.models.spec import ModelSpec

_ONE: Arity = (1, 1)
_ATTN_OUT = ("full", "post", "prefill")  # the parts whose value is the layer's AttnOut


@dataclass(frozen=True)
class NodeKind:
    """What the layers ask of one kind of node (see the module docstring)."""

    node: type  # its fields: the frozen dataclass in `graph`
    roles: Callable[[Any], dict[Role, Arity]]
    role: Callable[[Any, Node], Role | None]
    sizes: Callable[[Any], tuple[int, ...] | int]
    bind: Callable[[Any, Unit, tuple[int, ...]], Any]
    cost: str  # CostModel's method
    launches: int  # kernels a node takes
    output_bytes: Callable[[ModelSpec, int, Any], float]
    op: str  # DeviceWorker's method
    travels: dict[str, str] = dataclasses.field(default_factory=dict)  # payload -> codec


# -- inputs by role ---------------------------------------------------------------------

_ATTENTION_ROLES: dict[str, dict[Role, Arity]] = {
    "core": {"qkv": _ONE}, "post": {"core": _ONE, "pre": _ONE}, "store": {"kv": _ONE},
}
# per payload: the kind of node a transfer reads, its role, and (from an Attention) its part
# or (from a Transfer) its payload
_TRANSFER_SOURCES: dict[str, tuple[type, Role, str | None]] = {
    "dispatch": (Gate, "routing", None), "combine": (Expert, "out", None),
    "qkv": (Attention, "pre", "pre"), "hidden": (Attention, "core", "core"),
    "kv": (Attention, "attn", "prefill"), "weights": (Transfer, "pinned", "pin"),
}


def _no_roles(node: Node) -> dict[Role, Arity]:
    return {}  # Embed: token ids, from the unit


def _no_role(node: Node, src: Node) -> Role | None:
    return None


def _attention_roles(node: Attention) -> dict[Role, Arity]:
    return _ATTENTION_ROLES.get(node.part, {"hidden": _ONE})


def _attention_role(node: Attention, src: Node) -> Role | None:
    if node.part == "core":
        return "qkv" if isinstance(src, Transfer) and src.payload == "qkv" else None
    if node.part == "store":
        return "kv" if isinstance(src, Transfer) and src.payload == "kv" else None
    if node.part == "post":
        if isinstance(src, Transfer) and src.payload == "hidden":
            return "core"
        return "pre" if isinstance(src, Attention) and src.part == "pre" else None
    return "hidden" if isinstance(src, (Embed, Combine)) else None


def _attn_roles(node: Node) -> dict[Role, Arity]:
    return {"attn": _ONE}


def _attn_role(node: Node, src: Node) -> Role | None:
    return "attn" if isinstance(src, Attention) and src.part in _ATTN_OUT else None


def _expert_roles(node: Expert) -> dict[Role, Arity]:
    return {"rows": (1, None), "pages": (0, None)} if node.kind == "routed" else {"attn": _ONE}


def _expert_role(node: Expert, src: Node) -> Role | None:
    if node.kind != "routed":
        return _attn_role(node, src)
    if isinstance(src, Gate) or (isinstance(src, Transfer) and src.payload == "dispatch"):
        return "rows"
    return "pages" if isinstance(src, Transfer) and src.payload == "weights" else None


def _transfer_roles(node: Transfer) -> dict[Role, Arity]:
    source = _TRANSFER_SOURCES.get(node.payload)  # one input, of its payload's source
    return {} if source is None else {source[1]: _ONE}


def _transfer_role(node: Transfer, src: Node) -> Role | None:
    source = _TRANSFER_SOURCES.get(node.payload)
    if source is None or not isinstance(src, source[0]):
        return None
    _, role, tag = source  # from an Attention its part, from a Transfer its payload
    if tag is None:
        return role
    return role if getattr(src, "payload" if isinstance(src, Transfer) else "part") == tag \
        else None


def _combine_roles(node: Combine) -> dict[Role, Arity]:
    return {"attn": _ONE, "routing": (0, 1), "partials": (0, None), "mlp": (0, None)}


def _combine_role(node: Combine, src: Node) -> Role | None:
    if isinstance(src, Attention):
        return "attn" if src.part in _ATTN_OUT else None
    if isinstance(src, Gate):
        return "routing"
    if isinstance(src, Expert):
        return "partials" if src.kind == "routed" else "mlp"
    return "partials" if isinstance(src, Transfer) and src.payload == "combine" else None


def _lm_head_roles(node: LMHead) -> dict[Role, Arity]:
    return {"hidden": _ONE}


def _lm_head_role(node: LMHead, src: Node) -> Role | None:
    return "hidden" if isinstance(src, Combine) else None


# -- sizes, bound from a unit -------------------------------------------------------------

def _tokens(unit: Unit, seqs: tuple[int, ...]) -> int:
    return sum(unit.seqs[i].num_tokens for i in seqs)


def _bind_tokens(node: Any, unit: Unit, seqs: tuple[int, ...]) -> Any:
    return dataclasses.replace(node, seqs=seqs, num_tokens=_tokens(unit, seqs))


def _bind_attention(node: Attention, unit: Unit, seqs: tuple[int, ...]) -> Attention:
    context = sum(unit.seqs[i].start + unit.seqs[i].num_tokens for i in seqs)
    return dataclasses.replace(node, seqs=seqs, num_tokens=_tokens(unit, seqs),
                               num_context=context)


def _bind_expert(node: Expert, unit: Unit, seqs: tuple[int, ...]) -> Expert:
    if node.kind == "routed":  # its rows come from the gates when it runs
        return node
    return dataclasses.replace(node, num_tokens=_tokens(unit, seqs))


def _bind_lm_head(node: LMHead, unit: Unit, seqs: tuple[int, ...]) -> LMHead:
    return dataclasses.replace(node, seqs=seqs, num_rows=sum(
        unit.seqs[i].num_logit_rows for i in seqs))


def _bind_nothing(node: Any, unit: Unit, seqs: tuple[int, ...]) -> Any:
    return node  # a transfer: sized when compiled, or by the gates' rows


def _no_sizes(node: Any) -> tuple[int, ...]:
    return ()


# -- memory effect: the bytes a node with static sizes leaves on its device ----------------

def _hidden_bytes(factor: int) -> Callable[[ModelSpec, int, Any], float]:
    def output(spec: ModelSpec, dtype_bytes: int, node: Any) -> float:
        tokens: int = node.num_tokens
        return float(factor * tokens * spec.hidden_size * dtype_bytes)
    return output


def _gate_bytes(spec: ModelSpec, dtype_bytes: int, node: Gate) -> float:
    return (1 + spec.moe.top_k) * node.num_tokens * spec.hidden_size * dtype_bytes


def _attention_bytes(spec: ModelSpec, dtype_bytes: int, node: Attention) -> float:
    d, a = spec.hidden_size, spec.attention
    width = {"pre": d + a.q_width + 2 * a.kv_width, "core": a.o_width,
             "prefill": 2 * d + 2 * a.kv_width, "store": 0}.get(node.part, 2 * d)
    return node.num_tokens * width * dtype_bytes


def _transfer_bytes(spec: ModelSpec, dtype_bytes: int, node: Transfer) -> float:
    # activations sized when compiled; a weight page lands in memory its policy reserved
    # (Scheduler.reserved_weights: the GPU's double buffer, the host's pinned relay)
    return 0 if node.payload in ("weights", "pin") else node.num_bytes or 0


def _lm_head_bytes(spec: ModelSpec, dtype_bytes: int, node: LMHead) -> float:
    return node.num_rows * spec.vocab_size * 4


# -- the kinds ------------------------------------------------------------------------------

KINDS: dict[type, NodeKind] = {k.node: k for k in (
    NodeKind(Embed, _no_roles, _no_role, attrgetter("num_tokens"), _bind_tokens,
             cost="_embed_cost", launches=1, output_bytes=_hidden_bytes(1), op="_run_embeds"),
    NodeKind(Attention, _attention_roles, _attention_role,
             attrgetter("num_tokens", "num_context"), _bind_attention,
             cost="_attention_cost", launches=12, output_bytes=_attention_bytes,
             op="_run_attention"),
    NodeKind(Gate, _attn_roles, _attn_role, attrgetter("num_tokens"), _bind_tokens,
             cost="_gate_cost", launches=6, output_bytes=_gate_bytes, op="_run_gates"),
    NodeKind(Expert, _expert_roles, _expert_role, attrgetter("num_tokens"), _bind_expert,
             cost="_expert_cost", launches=5, output_bytes=_hidden_bytes(1),
             op="_run_experts"),
    NodeKind(Transfer, _transfer_roles, _transfer_role, _no_sizes, _bind_nothing,
             cost="_transfer_cost", launches=1, output_bytes=_transfer_bytes,
             op="_run_transfers",
             travels={"dispatch": "rows", "combine": "partial", "weights": "page",
                      "pin": "page", "qkv": "tensor", "hidden": "tensor", "kv": "tensor"}),
    NodeKind(Combine, _combine_roles, _combine_role, attrgetter("num_tokens"), _bind_tokens,
             cost="_combine_cost", launches=3, output_bytes=_hidden_bytes(1),
             op="_run_combines"),
    NodeKind(LMHead, _lm_head_roles, _lm_head_role, attrgetter("num_rows"), _bind_lm_head,
             cost="_lm_head_cost", launches=3, output_bytes=_lm_head_bytes,
             op="_run_lm_heads"),
)}
assert set(KINDS) == set(NODE_KINDS), "every node kind is declared here"

