"""The dataflow graph of one forward pass: node kinds, units, placement and `Graph`.

Everything here is plain frozen data whose `repr` is valid Python (evaluate it with
`from moeflow.dataflow import *` in scope), so a failing case found by a property test can
be pasted into a regression test as it is.

Node kinds. Each node runs on one `device`; a Transfer runs from `src` to its `dsts`.
    Embed       token ids -> hidden, for the sequences homed on a device
    Attention   input norm, attention over the KV cache, residual add, post-attention norm
                (`part` "full"); or one part of it where the KV cache lives on another
                device (CGOPipe): "pre" (norm, QKV, RoPE), "core" (cache write and
                attention, where the cache is), "post" (output projection, residual, norm);
                or, for whole fresh prompts, "prefill" (all of it over the prompts' own
                keys, keeping no cache) and "store" (their keys and values written into the
                cache, where it is)
    Gate        router: top-k experts per token; its completion carries per-expert counts
    Expert      routed experts (a group of them, on their owner), a shared expert, or a
                dense MLP
    Transfer    bytes moving between devices: dispatch / combine of routed rows, hidden
                states, KV, weight pages (a page: `experts`, whole or, with `part` (k, n),
                the k-th of n slices of each one's intermediate width). A dispatch or
                combine goes to several devices at once, one device's part of an
                all-to-all: a dispatch sends each destination the rows of the experts it
                owns among `experts`; a combine returns its experts' outputs to each
                destination home. Every other transfer has one destination.
    Combine     residual + shared + routed partial outputs -> the layer's output
    LMHead      final norm and vocabulary projection for the rows that need logits

Each kind is declared in one place, `moeflow.dataflow.kinds`: its inputs by role, the sizes a
replayed plan binds, its memory effect, its cost and op (by the methods that run them), and
its payloads' codecs.

Edges are dependencies: `data` (read after write), `war` (write after read, for reused
buffers), and `control` (ordering with no data, e.g. a barrier).

Sizes can be dynamic: how many rows reach an expert is known only once its Gate has run.
Such Transfers have `num_bytes=None`; executors read the Gate's counts then.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal, Union

EdgeKind = Literal["data", "war", "control"]
ExpertKind = Literal["routed", "shared", "dense"]
Payload = Literal["dispatch", "combine", "hidden", "kv", "weights", "qkv", "pin"]
AttentionPart = Literal["full", "pre", "core", "post", "prefill", "store"]
LogitsMode = Literal["last", "all", "none"]


class GraphError(ValueError):
    """A graph is malformed: a dangling edge, a bad id, or a cycle."""


# -- units -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SeqChunk:
    """`num_tokens` new tokens of sequence `seq_id`, at positions start..start+num_tokens-1,
    served by (attention and KV cache on) device `home`."""

    seq_id: int
    start: int
    num_tokens: int
    home: str
    logits: LogitsMode = "last"

    def __post_init__(self) -> None:
        if self.start < 0 or self.num_tokens < 1:
            raise GraphError(f"sequence {self.seq_id}: start={self.start} must be >= 0 and "
                             f"num_tokens={self.num_tokens} >= 1")

    @property
    def num_logit_rows(self) -> int:
        return {"last": 1, "all": self.num_tokens, "none": 0}[self.logits]


@dataclass(frozen=True, slots=True)
class Unit:
    """A unit of work: the tokens of one forward pass over some sequences."""

    seqs: tuple[SeqChunk, ...]

    def __post_init__(self) -> None:
        if not self.seqs:
            raise GraphError("a unit needs at least one sequence")
        ids = [s.seq_id for s in self.seqs]
        if len(set(ids)) != len(ids):
            raise GraphError(f"a unit lists a sequence twice: {ids}")

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.seqs)

    def homes(self, order: tuple[str, ...]) -> tuple[str, ...]:
        """The devices serving this unit's sequences, in `order`."""
        used = {s.home for s in self.seqs}
        unknown = used - set(order)
        if unknown:
            raise GraphError(f"sequences are homed on unknown devices {sorted(unknown)}")
        return tuple(d for d in order if d in used)

    def seqs_on(self, device: str) -> tuple[int, ...]:
        return tuple(i for i, s in enumerate(self.seqs) if s.home == device)


# -- placement -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Placement:
    """Where routed experts live: `expert_owners[e]` indexes `devices`.

    The dispatch order of experts is owner-major (by device order), then by expert id; each
    device's experts, and each pipeline stage's group, are contiguous in that order."""

    devices: tuple[str, ...]
    expert_owners: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.devices:
            raise GraphError("a placement needs at least one device")
        if len(set(self.devices)) != len(self.devices):
            raise GraphError(f"devices listed twice: {self.devices}")
        for e, owner in enumerate(self.expert_owners):
            if not 0 <= owner < len(self.devices):
                raise GraphError(f"expert {e} owned by device index {owner}, "
                                 f"outside 0..{len(self.devices) - 1}")

    @staticmethod
    def sharded(devices: tuple[str, ...] | list[str], num_experts: int) -> Placement:
        """Experts split into contiguous, near-equal ranges, one per device in order."""
        devices = tuple(devices)
        n = len(devices)
        owners = tuple(min(e * n // num_experts, n - 1) for e in range(num_experts))
        return Placement(devices, owners)

    @property
    def num_experts(self) -> int:
        return len(self.expert_owners)

    def experts_of(self, device: str) -> tuple[int, ...]:
        index = self.devices.index(device)
        return tuple(e for e, owner in enumerate(self.expert_owners) if owner == index)

    def owner(self, expert: int) -> str:
        return self.devices[self.expert_owners[expert]]

    def owners(self) -> tuple[str, ...]:
        """Devices that own at least one expert, in device order."""
        used = set(self.expert_owners)
        return tuple(d for i, d in enumerate(self.devices) if i in used)

    def dispatch_order(self) -> tuple[int, ...]:
        return tuple(sorted(range(self.num_experts), key=lambda e: (self.expert_owners[e], e)))


# -- nodes -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Embed:
    id: int
    device: str
    seqs: tuple[int, ...]
    num_tokens: int


@dataclass(frozen=True, slots=True)
class Attention:
    id: int
    device: str
    layer: int
    seqs: tuple[int, ...]
    num_tokens: int
    num_context: int
    part: AttentionPart = "full"


@dataclass(frozen=True, slots=True)
class Gate:
    id: int
    device: str
    layer: int
    seqs: tuple[int, ...]
    num_tokens: int


@dataclass(frozen=True, slots=True)
class Expert:
    """Routed experts `experts` of `layer` on their owner (rows known after the gate), or a
    shared expert / dense MLP over `num_tokens` rows of the sequences homed here."""

    id: int
    device: str
    layer: int
    experts: tuple[int, ...] = ()
    kind: ExpertKind = "routed"
    num_tokens: int = 0
    stage: int = 0
    micro_batch: int = 0  # whose rows it takes, where the unit is cut into micro-batches


FAN_PAYLOADS = ("dispatch", "combine")  # the payloads that may go to several devices


@dataclass(frozen=True, slots=True)
class Transfer:
    id: int
    src: str
    dsts: tuple[str, ...]
    layer: int
    payload: Payload
    num_bytes: int | None = None
    experts: tuple[int, ...] = ()
    stage: int = 0
    part: tuple[int, int] = (0, 1)  # a weight page: slice k of n of its experts' FFN width
    micro_batch: int = 0  # a dispatch's or combine's micro-batch (see Expert)

    def __post_init__(self) -> None:
        k, n = self.part
        if not 0 <= k < n:
            raise GraphError(f"a transfer's part must be (k, n) with 0 <= k < n, got "
                             f"{self.part}")
        if not isinstance(self.dsts, tuple) or not self.dsts \
                or len(set(self.dsts)) != len(self.dsts) or (
                len(self.dsts) > 1 and (self.payload not in FAN_PAYLOADS
                                        or self.src in self.dsts)):
            raise GraphError(f"a {self.payload} transfer from {self.src} goes to one device, "
                             f"or (a dispatch or combine) to distinct others; got {self.dsts}")

    @property
    def device(self) -> str:
        return self.src

    @property
    def dst(self) -> str:
        """The destination of a transfer that has one."""
        if len(self.dsts) != 1:
            raise GraphError(f"transfer {self.id} goes to {len(self.dsts)} devices")
        return self.dsts[0]


def dispatch_groups(node: Transfer, placement: Placement) -> tuple[tuple[int, ...], ...]:
    """A dispatch's experts by destination: those each of its `dsts` owns, in order."""
    return tuple(tuple(e for e in node.experts if placement.owner(e) == d) for d in node.dsts)


@dataclass(frozen=True, slots=True)
class Combine:
    id: int
    device: str
    layer: int
    seqs: tuple[int, ...]
    num_tokens: int


@dataclass(frozen=True, slots=True)
class LMHead:
    id: int
    device: str
    seqs: tuple[int, ...]
    num_rows: int


Node = Union[Embed, Attention, Gate, Expert, Transfer, Combine, LMHead]
NODE_KINDS: tuple[type, ...] = (Embed, Attention, Gate, Expert, Transfer, Combine, LMHead)


# -- what each node kind reads: its inputs by role (declared in `kinds`) -------------------

Role = Literal["hidden", "qkv", "core", "pre", "kv", "attn", "routing", "rows", "pages",
               "out", "partials", "mlp", "pinned"]
Arity = tuple[int, Union[int, None]]


def input_roles(node: "Node") -> dict[Role, Arity]:
    """The roles a node of this kind reads its inputs in, with how many each takes
    (`moeflow.dataflow.kinds`)."""
    from moeflow.dataflow.kinds import KINDS

    return KINDS[type(node)].roles(node)


def input_role(node: "Node", src: "Node") -> Role | None:
    """The role in which `node` reads `src`'s value; None where its kind reads no such input
    (`moeflow.dataflow.kinds`)."""
    from moeflow.dataflow.kinds import KINDS

    return KINDS[type(node)].role(node, src)


@dataclass(frozen=True, slots=True)
class Edge:
    src: int
    dst: int
    kind: EdgeKind = "data"


# -- the graph -------------------------------------------------------------------------


@dataclass(frozen=True)
class Graph:
    """One forward pass of `unit` under `placement`. Node ids equal their index."""

    unit: Unit
    placement: Placement
    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]
    num_layers: int = field(default=0)

    def __post_init__(self) -> None:
        for i, node in enumerate(self.nodes):
            if node.id != i:
                raise GraphError(f"node at index {i} has id {node.id}")
        n = len(self.nodes)
        for edge in self.edges:
            if not (0 <= edge.src < n and 0 <= edge.dst < n) or edge.src == edge.dst:
                raise GraphError(f"bad edge {edge!r} in a graph of {n} nodes")
        object.__setattr__(self, "_topo", self._kahn())  # raises on a cycle

    @cached_property
    def _preds(self) -> tuple[tuple[int, ...], ...]:
        preds: list[list[int]] = [[] for _ in self.nodes]
        for edge in self.edges:
            preds[edge.dst].append(edge.src)
        return tuple(tuple(p) for p in preds)

    @cached_property
    def _data_preds(self) -> tuple[tuple[int, ...], ...]:
        preds: list[list[int]] = [[] for _ in self.nodes]
        for edge in self.edges:
            if edge.kind == "data":
                preds[edge.dst].append(edge.src)
        return tuple(tuple(p) for p in preds)

    @cached_property
    def _succs(self) -> tuple[tuple[int, ...], ...]:
        succs: list[list[int]] = [[] for _ in self.nodes]
        for edge in self.edges:
            succs[edge.src].append(edge.dst)
        return tuple(tuple(s) for s in succs)

    @cached_property
    def data_uses(self) -> tuple[int, ...]:
        """Per node: how many data edges read its output."""
        uses = [0] * len(self.nodes)
        for edge in self.edges:
            if edge.kind == "data":
                uses[edge.src] += 1
        return tuple(uses)

    def preds(self, node_id: int) -> tuple[int, ...]:
        return self._preds[node_id]

    def inputs(self, node_id: int) -> tuple[int, ...]:
        """Predecessors whose outputs this node reads, in edge order."""
        return self._data_preds[node_id]

    def roles(self, node_id: int) -> dict[Role, tuple[int, ...]]:
        """The node's inputs by the role it reads them in (`input_role`), each role's in edge
        order; an input its kind has no role for raises GraphError."""
        node = self.nodes[node_id]
        out: dict[Role, tuple[int, ...]] = {}
        for p in self._data_preds[node_id]:
            role = input_role(node, self.nodes[p])
            if role is None:
                raise GraphError(f"{type(node).__name__} {node_id} has no input role for "
                                 f"{type(self.nodes[p]).__name__} {p}")
            out[role] = out.get(role, ()) + (p,)
        return out

    def succs(self, node_id: int) -> tuple[int, ...]:
        return self._succs[node_id]

    def gates_read(self, node_id: int) -> tuple[int, ...]:
        """The gates whose rows a node takes, read directly or through a dispatch (a routed
        Expert's), in id order."""
        out = set()
        for p in self.inputs(node_id):
            src = self.nodes[p]
            if isinstance(src, Gate):
                out.add(p)
            elif isinstance(src, Transfer) and src.payload == "dispatch":
                out.update(q for q in self.inputs(p) if isinstance(self.nodes[q], Gate))
        return tuple(sorted(out))

    def topological_order(self) -> tuple[int, ...]:
        """Kahn's algorithm, first-ready first; a cycle raises GraphError (at construction)."""
        return self._topo  # type: ignore[attr-defined,no-any-return]

    def _kahn(self) -> tuple[int, ...]:
        indegree = [0] * len(self.nodes)
        succs: list[list[int]] = [[] for _ in self.nodes]
        for edge in self.edges:
            indegree[edge.dst] += 1
            succs[edge.src].append(edge.dst)
        ready = deque(i for i, d in enumerate(indegree) if d == 0)
        order: list[int] = []
        while ready:
            i = ready.popleft()
            order.append(i)
            for j in succs[i]:
                indegree[j] -= 1
                if indegree[j] == 0:
                    ready.append(j)
        if len(order) != len(self.nodes):
            stuck = [i for i, d in enumerate(indegree) if d > 0]
            raise GraphError(f"the graph has a cycle through nodes {stuck[:10]}")
        return tuple(order)

    @cached_property
    def micro_batched(self) -> bool:
        """Whether some device runs several chains of Embed -> ... -> LMHead, one per
        micro-batch of its sequences (each node's `seqs` then names its micro-batch)."""
        devices = [n.device for n in self.nodes if isinstance(n, Embed)]
        return len(devices) != len(set(devices))

    @cached_property
    def micro_batch_of_seq(self) -> dict[int, int]:
        """Each sequence's micro-batch: the chain it is in on its home (the compilers build
        the chains in micro-batch order, so a device's m-th Embed starts micro-batch m)."""
        count: dict[str, int] = {}
        out: dict[int, int] = {}
        for node in self.nodes:
            if isinstance(node, Embed):
                m = count[node.device] = count.get(node.device, -1) + 1
                out.update((i, m) for i in node.seqs)
        return out

    @property
    def num_micro_batches(self) -> int:
        """M: the most chains a home's sequences are cut into (1 for a graph without)."""
        return max(self.micro_batch_of_seq.values(), default=0) + 1

    def of_kind(self, kind: type) -> tuple[Node, ...]:
        return tuple(n for n in self.nodes if isinstance(n, kind))

    def layer_nodes(self, layer: int) -> tuple[Node, ...]:
        return tuple(n for n in self.nodes if getattr(n, "layer", None) == layer)

    def devices(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for n in self.nodes:
            if isinstance(n, Transfer):
                seen.setdefault(n.src)
                for d in n.dsts:
                    seen.setdefault(d)
            else:
                seen.setdefault(n.device)
        return tuple(seen)
