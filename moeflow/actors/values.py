"""What flows along a graph's data edges on the actors, and how a Transfer's value travels.

Values flowing along data edges:
    Embed, Combine          hidden [T, D]
    Attention               AttnOut(resid [T, D], xn [T, D])
    Attention(pre)          PreOut(hidden [T, D], qkv [T, *]: rotated q and k, and v)
    Transfer(qkv)           its qkv [T, *]
    Attention(prefill)      AttnOut, with the new tokens' keys and values kv [T, 2K d]
    Transfer(kv)            its kv [T, 2K d]
    Attention(store)        None (it writes the KV cache)
    Attention(core)         attention output [T, H*v], as is Transfer(hidden)
    Transfer(pin)           Page: a contiguous group of one layer's routed experts, whole
                            or a slice of each one's intermediate width, copied into the
                            owner's pinned relay
    Transfer(weights)       that Page, from the relay
    Gate                    Routing (rows sorted by dispatch order, their tokens and weights)
    Transfer(dispatch)      a Rows per destination: one home's rows for the expert group
                            that destination owns (each sent on its own)
    Expert(routed)          ExpertOut: weighted output rows per home
    Transfer(combine)       a Partial per destination home: its rows of the group
    Expert(shared / dense)  [T, D]
    LMHead                  Logits [R, V] (fp32)

Shapes: T tokens, D hidden, N routed rows, R logit rows, V vocab, G experts of a group.
A node reads them as `Inputs`: by the role its kind reads each in
(moeflow.dataflow.graph.input_role), never by the order of its edges.
`to_payload` / `from_payload` turn a Transfer's value into a message payload and back
(checked), `payload_to` moves a received one to the receiving worker's device: each value
that travels declares its own codec (`Travels`), listed once in TRAVELS.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import Any, ClassVar, Protocol

import torch

from moeflow.actors.messages import MessageError, Payload
from moeflow.dataflow.graph import Node
from moeflow.ops.experts import counts_of

# a node's inputs: per role, (producer node, value) in edge order
Inputs = dict[str, list[tuple[Node, Any]]]


@dataclass
class AttnOut:
    resid: torch.Tensor  # [T, D] residual stream after attention
    xn: torch.Tensor  # [T, D] its post-attention norm: the FFN input
    kv: torch.Tensor | None = None  # [T, 2K d] a prefill part's keys and values, for the cache


@dataclass
class Routing:
    xn: torch.Tensor  # [T, D]
    token_of_row: torch.Tensor  # [N] token of each routed row, rows in dispatch order
    weight_of_row: torch.Tensor  # [N] fp32
    offsets: list[int]  # [E+1] first row of each dispatch rank
    ends: torch.Tensor  # [E] int32: offsets[1:], for grouped matmul
    counts: tuple[int, ...]  # rows per expert id
    rows: torch.Tensor | None = None  # [N, D] xn's row of each routed row, if gathered


@dataclass
class Rows:
    """Routed rows of one home for one contiguous expert group. How many rows go to each of
    its experts is held as a tensor of cumulative ends (what a grouped GEMM on a GPU takes,
    and what travels) or as a list of counts (what the CPU kernels take: made from the
    gate's offsets with no tensor op); each is made from the other when asked for."""

    home: str
    start: int  # first row within the home's dispatch order
    x: torch.Tensor  # [n, D]
    ends: torch.Tensor | None  # [G] int32 cumulative row ends per expert of the group
    weights: torch.Tensor  # [n] fp32
    counts: list[int] | None = None  # [G] rows per expert of the group

    KIND: ClassVar[str] = "rows"

    def row_ends(self) -> torch.Tensor:
        if self.ends is None:
            assert self.counts is not None, "Rows holds its ends or its counts"
            self.ends = torch.tensor(list(accumulate(self.counts)), dtype=torch.int32,
                                     device=self.x.device)
        return self.ends

    def row_counts(self) -> list[int]:
        if self.counts is None:
            assert self.ends is not None, "Rows holds its ends or its counts"
            self.counts = counts_of(self.ends)
        return self.counts

    def encode(self) -> tuple[dict[str, Any], tuple[torch.Tensor, ...]]:
        return {"home": self.home, "start": self.start}, (self.x, self.row_ends(), self.weights)

    @classmethod
    def decode(cls, meta: dict[str, Any], t: tuple[torch.Tensor, ...]) -> Rows:
        if len(t) != 3:
            raise MessageError(f"bad rows payload with {len(t)} tensors")
        x, ends, weights = t
        if (x.dim() != 2 or ends.dtype != torch.int32 or weights.shape != (x.shape[0],)
                or (len(ends) and int(ends[-1]) != x.shape[0])):
            raise MessageError(f"inconsistent rows: x {list(x.shape)}, ends "
                               f"{list(ends.shape)}, weights {list(weights.shape)}")
        return cls(str(meta["home"]), int(meta["start"]), x, ends, weights)

    def to(self, device: torch.device) -> Rows:
        if self.x.device == device:
            return self
        return Rows(self.home, self.start, self.x.to(device, non_blocking=True),
                    None if self.ends is None else self.ends.to(device, non_blocking=True),
                    self.weights.to(device, non_blocking=True), self.counts)


@dataclass
class Partial:
    start: int
    y: torch.Tensor  # [n, D] weighted expert outputs

    KIND: ClassVar[str] = "partial"

    def encode(self) -> tuple[dict[str, Any], tuple[torch.Tensor, ...]]:
        return {"start": self.start}, (self.y,)

    @classmethod
    def decode(cls, meta: dict[str, Any], t: tuple[torch.Tensor, ...]) -> Partial:
        if len(t) != 1 or t[0].dim() != 2:
            raise MessageError(f"bad partial payload: {len(t)} tensors, expected one of rows")
        return cls(int(meta["start"]), t[0])

    def to(self, device: torch.device) -> Partial:
        return self if self.y.device == device else Partial(self.start, self.y.to(device))


@dataclass
class ExpertOut:
    parts: dict[str, Partial]


@dataclass
class PreOut:
    hidden: torch.Tensor  # [T, D] the layer's input: the residual
    qkv: torch.Tensor  # [T, (H + 2K) d] q and k normed and rotated, v


@dataclass
class Page:
    """Routed experts `experts` of one layer (contiguous in the dispatch order), as their
    owner stacks them: whole (`columns` None), or the columns [start, end) of each one's
    intermediate width F (its gate and up rows, its down columns; f = end - start)."""

    experts: tuple[int, ...]
    gate_up: torch.Tensor  # [G, 2F, D], or [G, 2f, D]: the gate rows, then the up rows
    down: torch.Tensor  # [G, D, F], or [G, D, f]
    gate_up_bias: torch.Tensor | None = None  # [G, 2F] or [G, 2f]
    down_bias: torch.Tensor | None = None  # [G, D]
    columns: tuple[int, int] | None = None

    KIND: ClassVar[str] = "page"

    def tensors(self) -> tuple[torch.Tensor, ...]:
        biases = () if self.gate_up_bias is None else (self.gate_up_bias, self.down_bias)
        return (self.gate_up, self.down, *biases)  # type: ignore[return-value]

    def encode(self) -> tuple[dict[str, Any], tuple[torch.Tensor, ...]]:
        meta: dict[str, Any] = {"experts": list(self.experts)}
        if self.columns is not None:
            meta["columns"] = list(self.columns)
        return meta, self.tensors()

    @classmethod
    def decode(cls, meta: dict[str, Any], t: tuple[torch.Tensor, ...]) -> Page:
        if len(t) not in (2, 4):
            raise MessageError(f"bad page payload with {len(t)} tensors")
        experts = tuple(int(e) for e in meta["experts"])
        columns = meta.get("columns")
        span = None if columns is None else (int(columns[0]), int(columns[1]))
        if t[0].dim() != 3 or t[1].dim() != 3 or not t[0].shape[0] == t[1].shape[0] \
                == len(experts) or t[0].shape[1] != 2 * t[1].shape[2] \
                or (span is not None and not 0 <= span[0] < span[1] == span[0]
                    + t[1].shape[2]):
            raise MessageError(f"inconsistent page: experts {list(experts)}, columns "
                               f"{span}, gate_up {list(t[0].shape)}, down "
                               f"{list(t[1].shape)}")
        return cls(experts, *t, columns=span)

    def to(self, device: torch.device) -> Page:
        if self.gate_up.device == device:
            return self
        return Page(self.experts, *(t.to(device) for t in self.tensors()), columns=self.columns)


@dataclass
class Logits:
    seqs: tuple[int, ...]  # unit sequence indices
    rows_per_seq: tuple[int, ...]
    values: torch.Tensor  # [R, V] fp32


class Travels(Protocol):
    """A value a Transfer carries, and its codec: its payload kind, its plain fields and
    tensors (`encode`), itself rebuilt from them and checked (`decode`), and itself on
    another device (`to`). A new kind of value that travels is a class with these, listed
    in TRAVELS; a plain tensor travels as the kind "tensor"."""

    KIND: ClassVar[str]

    def encode(self) -> tuple[dict[str, Any], tuple[torch.Tensor, ...]]: ...

    @classmethod
    def decode(cls, meta: dict[str, Any], tensors: tuple[torch.Tensor, ...]) -> Any: ...

    def to(self, device: torch.device) -> Any: ...


TRAVELS: dict[str, type[Travels]] = {c.KIND: c for c in (Rows, Partial, Page)}
_TRAVELLING = frozenset(TRAVELS.values())


def payload_to(value: Any, device: torch.device) -> Any:
    """A received Transfer value, moved to this worker's device if it is elsewhere."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    return value.to(device) if type(value) in _TRAVELLING else value


def to_payload(value: Any) -> Payload:
    """A Transfer's value as a message payload (no copy)."""
    if isinstance(value, torch.Tensor):
        return Payload("tensor", {}, (value,), value)
    if type(value) not in _TRAVELLING:
        raise TypeError(f"cannot send a {type(value).__name__}")
    return Payload(value.KIND, None, None, value)  # encoded if it leaves the process


def from_payload(payload: Payload) -> Any:
    """The value a Transfer carried: checked, unless this process made it."""
    if payload.value is not None:
        return payload.value
    t = payload.tensors
    if payload.kind == "tensor":
        if len(t) != 1:
            raise MessageError(f"bad tensor payload with {len(t)} tensors")
        return t[0]
    codec = TRAVELS.get(payload.kind)
    if codec is None:
        raise MessageError(f"unknown payload kind {payload.kind!r} (known: tensor, "
                           f"{', '.join(TRAVELS)})")
    try:
        return codec.decode(payload.meta, t)
    except MessageError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise MessageError(f"bad {payload.kind} payload: {exc}") from None
