"""Every message the runtime sends, and its wire format.

A message is a frozen dataclass. On ZeroMQ it travels as a multipart message

    [kind (1 byte), msgpack header, tensor frame, tensor frame, ...]

The header holds the message's plain fields; tensors go as raw frames (sent with
copy=False and received without a copy), described in the header by dtype and shape.
Pickle is never used: `decode` accepts only the kinds below and checks every field, so a
malformed or unknown message raises MessageError, which receivers log and drop.

    coordinator -> actor   Peers, RunUnit, Release, Abort, Shutdown, DropPlans
    actor -> coordinator   Hello, UnitPart, RoutingCounts, Heartbeat, NodeFailed
    actor -> actor         Data, Done

Several messages for one destination may travel as one batch (`pack`), which costs one
send, one wakeup and one CURVE box instead of one each:

    [BATCH, msgpack [[kind, number of frames], ...], header, frames..., header, frames...]

Consecutive Data of one payload kind whose tensors are small and alike (a coalesced group
of transfers: the same layer's rows of several units, to one peer) go as one entry of it,
a run (`encode_many`): one header for all, and each tensor position concatenated into one
frame, which the receiver splits into views. A small message's cost is its header, its
objects and a frame per tensor, not its bytes: 8 decode-sized rows payloads cost 105 us to
encode and 147 to decode and check as messages, 56 and 87 as a run:

    [DATA_RUN, msgpack {kind, tensors: [[dtype, shape]...],
                        members: [[unit_id, node_id, meta, counts, [rows per tensor]]...]},
     tensor frame, tensor frame, ...]

`decode_all` reads every form, a run as its Data one by one. The in-process transport hands
the same objects over without encoding them.
"""

from __future__ import annotations

import dataclasses
import warnings
from array import array
from dataclasses import dataclass, field
from typing import Any, Union

import msgpack
import torch

from moeflow.dataflow import graph as g
from moeflow.scheduler.plan import ByPriority, InOrder, Plan, Stream

warnings.filterwarnings("ignore", message="The given buffer is not writable")


class MessageError(ValueError):
    """A message that cannot be decoded: unknown kind, bad header, wrong tensor sizes."""


# -- payloads moved by Transfer nodes ------------------------------------------------


class Payload:
    """What a Transfer carries: a kind (`"tensor"`, or a value kind that travels:
    moeflow.actors.values.TRAVELS), small plain fields (`meta`) and `tensors`.

    `value`: the value it was made from, in the process that made it. A receiver in that
    process takes it as it is, with no checks (it never left this process); it is never
    encoded, so a payload that came over the wire is rebuilt from its parts and checked.
    Made from a value (meta and tensors None), the parts are encoded only when first read:
    a delivery within the process never reads them (a dispatch's rows once built an index
    tensor at every layer for nothing)."""

    __slots__ = ("kind", "_meta", "_tensors", "value")

    def __init__(self, kind: str, meta: dict[str, Any] | None,
                 tensors: tuple[torch.Tensor, ...] | None, value: Any = None) -> None:
        if (meta is None or tensors is None) and value is None:
            raise ValueError("a payload needs its meta and tensors, or the value to encode")
        self.kind, self._meta, self._tensors, self.value = kind, meta, tensors, value

    @property
    def meta(self) -> dict[str, Any]:
        if self._meta is None:
            self._encode()
        assert self._meta is not None
        return self._meta

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        if self._tensors is None:
            self._encode()
        assert self._tensors is not None
        return self._tensors

    def _encode(self) -> None:
        value = self.value
        if isinstance(value, torch.Tensor):
            self._meta, self._tensors = {}, (value,)
        else:
            self._meta, self._tensors = value.encode()

    def __repr__(self) -> str:
        return f"Payload({self.kind!r}, {self.meta!r}, <{len(self.tensors)} tensors>)"


# -- messages ------------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    actor: str
    data_address: str
    pid: int


@dataclass(frozen=True)
class Peers:
    addresses: dict[str, str]  # actor -> its data socket address


@dataclass(frozen=True)
class RunUnit:
    """One unit's whole plan, to every actor that runs part of it, in one message.

    `unit` is what runs: the plan may have been compiled for another unit of the same
    shape. A cached plan (`plan_id` set) travels once to each actor; later RunUnits of the
    same shape carry only its id (`plan` None) and the unit bound to it."""

    unit_id: int
    plan: Plan | None
    tokens: dict[int, list[int]]  # unit seq index -> new token ids (for its home actor)
    sampling: dict[int, dict[str, Any]]  # seq id -> SamplingParams fields
    want_logits: bool = False
    unit: g.Unit | None = None  # None: the plan's own unit
    plan_id: int | None = None
    trace: bool = False  # time the nodes and arrivals; they come back with the UnitPart
    want_routing: bool = False  # each gate's rows per expert, as RoutingCounts


@dataclass(frozen=True)
class Data:
    unit_id: int
    node_id: int
    payload: Payload
    # a dispatch's: its gate's rows per expert, so that the owner knows the layer's counts
    counts: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Done:
    unit_id: int
    node_id: int


@dataclass(frozen=True)
class UnitPart:
    """An actor finished its share of a unit: the tokens it sampled (unit seq index ->
    token id), if asked, their logits, and the sequences it could not sample (unit seq
    index -> why): those fail alone."""

    unit_id: int
    actor: str
    tokens: dict[int, int]
    logits: dict[int, torch.Tensor] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    # unit seq index -> (the token's log-probability, ((id, log-probability) of the top k))
    logprobs: dict[int, tuple[float, tuple[tuple[int, float], ...]]] = field(
        default_factory=dict)
    # with RunUnit.trace: (node id, start, end) of each node run here, and (node id, when)
    # each other actor's node was heard of here, in time.monotonic() seconds
    spans: tuple[tuple[int, float, float], ...] = ()
    arrivals: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class RoutingCounts:
    """A gate's rows per expert, for a RunUnit that asked (`want_routing`: the coordinator
    records them)."""

    unit_id: int
    layer: int
    counts: tuple[int, ...]


@dataclass(frozen=True)
class Heartbeat:
    """The actor's shell is alive; and what its core thread is doing: how many steps (a
    node, or a message handled) it has finished, how long its current step has run (0.0:
    it waits for work), and the messages it dropped so far, by reason."""

    actor: str
    time: float
    num_done: int = 0
    running_s: float = 0.0
    dropped: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class NodeFailed:
    unit_id: int
    actor: str
    error: str


@dataclass(frozen=True)
class Release:
    seq_ids: tuple[int, ...]


@dataclass(frozen=True)
class Abort:
    unit_ids: tuple[int, ...]


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass(frozen=True)
class DropPlans:
    """Cached plans that will not run again: the actor forgets them."""

    plan_ids: tuple[int, ...]


Message = Union[Hello, Peers, RunUnit, Data, Done, UnitPart, RoutingCounts, Heartbeat,
                NodeFailed, Release, Abort, Shutdown, DropPlans]

KINDS: dict[type, int] = {Hello: 1, Peers: 2, RunUnit: 3, Data: 4, Done: 5, UnitPart: 6,
                          RoutingCounts: 7, Heartbeat: 8, NodeFailed: 9, Release: 10, Abort: 11,
                          Shutdown: 12, DropPlans: 13}
BY_KIND = {v: k for k, v in KINDS.items()}
BATCH = 0x80  # the kind byte of a batch of messages: no Message has it
DATA_RUN = 0x81  # the kind byte of a run of Data (see the module's docstring)
MAX_BATCH = 65536  # messages in one batch, Data in one run
RUN_BYTES = 1 << 18  # a run's tensor bytes at most: larger payloads go alone, without a copy
RUN_KINDS = ("rows", "partial", "tensor")  # payloads that may travel in a run


# -- tensors as frames ---------------------------------------------------------------

DTYPES = {str(t).removeprefix("torch."): t for t in (
    torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.uint8,
    torch.int8, torch.bool, torch.float64)}
DTYPE_NAMES = {t: name for name, t in DTYPES.items()}


def tensor_frame(t: torch.Tensor) -> tuple[list[Any], memoryview]:
    """[dtype, shape] and a zero-copy byte view of `t` (made contiguous if needed). A tensor
    on an accelerator is staged through host memory first."""
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    raw = t.detach().view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    return [DTYPE_NAMES[t.dtype], list(t.shape)], memoryview(raw.numpy())  # type: ignore[arg-type]


def frame_tensor(meta: Any, frame: Any) -> torch.Tensor:
    try:
        dtype_name, shape = meta
        dtype = DTYPES[dtype_name]
        shape = [int(s) for s in shape]
    except (TypeError, ValueError, KeyError):
        raise MessageError(f"bad tensor description {meta!r}") from None
    buffer = frame.buffer if hasattr(frame, "buffer") else frame
    numel = 1
    for s in shape:
        if s < 0:
            raise MessageError(f"negative dimension in {shape}")
        numel *= s
    nbytes = numel * dtype.itemsize
    if len(buffer) != nbytes:
        raise MessageError(f"tensor frame of {len(buffer)} bytes for {dtype_name}{shape} "
                           f"({nbytes} bytes)")
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype).view(shape)


# -- plans as plain data --------------------------------------------------------------

NODE_CODES = {cls: i for i, cls in enumerate(g.NODE_KINDS)}
EDGE_KINDS: tuple[g.EdgeKind, ...] = ("data", "war", "control")


def plan_to_wire(plan: Plan) -> dict[str, Any]:
    graph = plan.graph
    streams = list(dict.fromkeys(plan.assignment))
    index = {s: i for i, s in enumerate(streams)}
    edges: list[int] = []
    for e in graph.edges:
        edges.extend((e.src, e.dst, EDGE_KINDS.index(e.kind)))
    rules = []
    for s, rule in plan.rules:
        rules.append([index[s], "o", list(rule.order)] if isinstance(rule, InOrder)
                     else [index[s], "p", rule.coalesce, rule.fifo])
    return {
        "unit": unit_to_wire(graph.unit),
        "placement": [list(graph.placement.devices), list(graph.placement.expert_owners)],
        "nodes": [[NODE_CODES[type(n)], *[_plain(getattr(n, f.name))
                                          for f in dataclasses.fields(n)]]
                  for n in graph.nodes],
        "edges": edges, "layers": graph.num_layers,
        "streams": [[s.actor, s.name] for s in streams],
        "assign": [index[s] for s in plan.assignment], "rules": rules,
        "priority": [list(k) for k in plan.priority],
        "merge": [None if k is None else list(k) for k in plan.merge],
        "lead": list(plan.lead),
    }


def unit_to_wire(unit: g.Unit) -> list[list[Any]]:
    return [[c.seq_id, c.start, c.num_tokens, c.home, c.logits] for c in unit.seqs]


def unit_from_wire(data: Any) -> g.Unit:
    try:
        seqs = tuple(g.SeqChunk(int(s), int(st), int(n), str(h), lg)
                     for s, st, n, h, lg in data)
        if any(c.logits not in ("last", "all", "none") for c in seqs):
            raise ValueError("logits must be last, all or none")
        return g.Unit(seqs)
    except Exception as exc:
        raise MessageError(f"bad unit: {type(exc).__name__}: {exc}") from None


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def plan_from_wire(data: Any) -> Plan:
    try:
        unit = unit_from_wire(data["unit"])
        devices, owners = data["placement"]
        placement = g.Placement(tuple(devices), tuple(int(o) for o in owners))
        nodes = []
        for row in data["nodes"]:
            cls = g.NODE_KINDS[row[0]]
            values = [tuple(v) if isinstance(v, list) else v for v in row[1:]]
            nodes.append(cls(*values))
        flat = data["edges"]
        edges = tuple(g.Edge(flat[i], flat[i + 1], EDGE_KINDS[flat[i + 2]])
                      for i in range(0, len(flat), 3))
        graph = g.Graph(unit, placement, tuple(nodes), edges, int(data["layers"]))
        streams = [Stream(str(a), str(n)) for a, n in data["streams"]]
        assignment = tuple(streams[i] for i in data["assign"])
        rules = tuple((streams[r[0]], InOrder(tuple(r[2])) if r[1] == "o"
                       else ByPriority(coalesce=bool(r[2]), fifo=bool(r[3])))
                      for r in data["rules"])
        priority = tuple(tuple(float(x) for x in k) for k in data["priority"])
        merge = tuple(None if k is None else tuple(k) for k in data["merge"])
        lead = tuple(str(name) for name in data["lead"])
        return Plan(graph, assignment, rules, priority, merge, lead)
    except MessageError:
        raise
    except Exception as exc:  # any malformed structure: refuse it with its reason
        raise MessageError(f"bad plan: {type(exc).__name__}: {exc}") from None


# -- whole messages ------------------------------------------------------------------


def encode(msg: Message) -> list[Any]:
    """-> [kind byte, header, *tensor frames] for send_multipart(copy=False)."""
    frames: list[Any] = []

    def tensors(ts: Any) -> list[Any]:
        metas = []
        for t in ts:
            meta, frame = tensor_frame(t)
            metas.append(meta)
            frames.append(frame)
        return metas

    kind = KINDS[type(msg)]
    header: dict[str, Any]
    if isinstance(msg, RunUnit):
        header = {"unit_id": msg.unit_id,
                  "plan": None if msg.plan is None else plan_to_wire(msg.plan),
                  "tokens": [[k, v] for k, v in msg.tokens.items()],
                  "sampling": [[k, v] for k, v in msg.sampling.items()],
                  "want_logits": msg.want_logits, "plan_id": msg.plan_id,
                  "unit": None if msg.unit is None else unit_to_wire(msg.unit),
                  "trace": msg.trace, "want_routing": msg.want_routing}
    elif isinstance(msg, Data):
        p = msg.payload
        header = {"unit_id": msg.unit_id, "node_id": msg.node_id, "kind": p.kind,
                  "meta": p.meta, "tensors": tensors(p.tensors),
                  "counts": None if msg.counts is None else list(msg.counts)}
    elif isinstance(msg, UnitPart):
        keys = list(msg.logits)
        header = {"unit_id": msg.unit_id, "actor": msg.actor,
                  "tokens": [[k, v] for k, v in msg.tokens.items()], "logit_keys": keys,
                  "logits": tensors(msg.logits[k] for k in keys),
                  "errors": [[k, v] for k, v in msg.errors.items()],
                  "logprobs": [[k, lp, [list(p) for p in top]]
                               for k, (lp, top) in msg.logprobs.items()],
                  "spans": [list(s) for s in msg.spans],
                  "arrivals": [list(a) for a in msg.arrivals]}
    else:
        header = {f.name: _plain(getattr(msg, f.name)) for f in dataclasses.fields(msg)}
    return [bytes([kind]), msgpack.packb(header, use_bin_type=True), *frames]


def pack(encoded: list[list[Any]]) -> list[Any]:
    """Encoded messages (each from `encode`) for one destination as one multipart."""
    if len(encoded) == 1:
        return encoded[0]
    index = [[_bytes(frames[0])[0], len(frames) - 1] for frames in encoded]
    out: list[Any] = [bytes([BATCH]), msgpack.packb(index)]
    for frames in encoded:
        out.extend(frames[1:])
    return out


def encode_many(msgs: list[Message]) -> list[Any]:
    """Messages for one destination as one multipart, in order: a batch (`pack`) in which
    each stretch of consecutive Data that may travel together is one run."""
    encoded: list[list[Any]] = []
    run: list[Data] = []
    run_key: Any = None
    run_bytes = 0
    for msg in msgs:
        key, nbytes = _run_key(msg)
        if run and (key != run_key or run_bytes + nbytes > RUN_BYTES or len(run) == MAX_BATCH):
            encoded.append(_encode_run(run))
            run = []
        if key is None:
            encoded.append(encode(msg))
            continue
        if not run:
            run_key, run_bytes = key, 0
        run.append(msg)  # type: ignore[arg-type]
        run_bytes += nbytes
    if run:
        encoded.append(_encode_run(run))
    return pack(encoded)


def _run_key(msg: Message) -> tuple[Any, int]:
    """What Data must share to travel in one run (its payload kind, and each tensor's
    dtype and shape past the first dimension), and its tensor bytes; (None, 0) if it
    travels alone."""
    if type(msg) is not Data or msg.payload.kind not in RUN_KINDS:
        return None, 0
    key: list[Any] = [msg.payload.kind]
    nbytes = 0
    for t in msg.payload.tensors:
        if not t.is_cpu or not t.ndim:
            return None, 0
        key.append((t.dtype, t.shape[1:]))
        nbytes += t.nbytes
    if nbytes > RUN_BYTES:
        return None, 0
    return tuple(key), nbytes


def _encode_run(run: list[Data]) -> list[Any]:
    """A run's frames; a single Data as itself."""
    if len(run) == 1:
        return encode(run[0])
    frames: list[Any] = []
    metas: list[Any] = []
    for i in range(len(run[0].payload.tensors)):
        meta, frame = tensor_frame(torch.cat([m.payload.tensors[i] for m in run]))
        metas.append(meta)
        frames.append(frame)
    header = {"kind": run[0].payload.kind, "tensors": metas,
              "members": [[m.unit_id, m.node_id, m.payload.meta,
                           None if m.counts is None else list(m.counts),
                           [t.shape[0] for t in m.payload.tensors]] for m in run]}
    return [bytes([DATA_RUN]), msgpack.packb(header, use_bin_type=True), *frames]


def _decode_run(parts: list[Any]) -> list[Message]:
    """A run's Data, each with views of the run's frames."""
    if len(parts) < 2:
        raise MessageError(f"a run needs at least 2 frames, got {len(parts)}")
    try:
        h = msgpack.unpackb(_bytes(parts[1]), raw=False, strict_map_key=False)
    except Exception as exc:
        raise MessageError(f"bad run header: {exc}") from None
    try:
        return _run_members(h, parts[2:])
    except MessageError:
        raise
    except Exception as exc:
        raise MessageError(f"bad run: {type(exc).__name__}: {exc}") from None


def _run_members(h: Any, frames: list[Any]) -> list[Message]:
    if not (isinstance(h, dict) and h.get("kind") in RUN_KINDS
            and isinstance(h.get("members"), list) and 0 < len(h["members"]) <= MAX_BATCH):
        raise MessageError("bad run header: expected a payload kind and 1 or more members")
    tensors = _tensors(h.get("tensors"), frames)
    members = h["members"]
    if not all(isinstance(m, list) and len(m) == 5 and type(m[0]) is int
               and type(m[1]) is int and isinstance(m[2], dict) and isinstance(m[4], list)
               and len(m[4]) == len(tensors) and all(type(n) is int and n >= 0 for n in m[4])
               for m in members):
        raise MessageError("bad run member: expected [unit_id, node_id, meta, counts, "
                           "[rows per tensor]]")
    pieces = []
    for i, t in enumerate(tensors):
        rows = [m[4][i] for m in members]
        if not t.dim() or sum(rows) != t.shape[0]:
            raise MessageError(f"a run's tensor {i} has {t.shape[0] if t.dim() else 0} rows, "
                               f"its members {sum(rows)}")
        pieces.append(torch.split(t, rows))
    kind = h["kind"]
    return [Data(m[0], m[1], Payload(kind, m[2], tuple(p[j] for p in pieces)), _counts(m[3]))
            for j, m in enumerate(members)]


def decode_all(parts: list[Any]) -> list[Message]:
    """The messages in a multipart frame list: one, a run's Data, or a batch's (see `pack`
    and `encode_many`)."""
    first = _bytes(parts[0]) if parts else b""
    if first == bytes([DATA_RUN]):
        return _decode_run(parts)
    if first != bytes([BATCH]):
        return [decode(parts)]
    try:
        index = msgpack.unpackb(_bytes(parts[1]), raw=False) if len(parts) > 1 else None
    except Exception as exc:
        raise MessageError(f"bad batch index: {exc}") from None
    if not (isinstance(index, list) and 0 < len(index) <= MAX_BATCH and all(
            isinstance(e, list) and len(e) == 2 and all(type(v) is int for v in e)
            and (e[0] in BY_KIND or e[0] == DATA_RUN) and e[1] >= 1 for e in index)):
        raise MessageError("bad batch index: a list of [message kind, number of frames]")
    if sum(n for _, n in index) != len(parts) - 2:
        raise MessageError(f"a batch of {sum(n for _, n in index)} frames came with "
                           f"{len(parts) - 2}")
    out: list[Message] = []
    at = 2
    for kind, num_frames in index:
        entry = [bytes([kind]), *parts[at:at + num_frames]]
        if kind == DATA_RUN:
            out.extend(_decode_run(entry))
        else:
            out.append(decode(entry))
        at += num_frames
    return out


def decode(parts: list[Any]) -> Message:
    """The message in a multipart frame list (zmq Frames or bytes)."""
    if len(parts) < 2:
        raise MessageError(f"a message needs at least 2 frames, got {len(parts)}")
    raw_kind = _bytes(parts[0])
    if len(raw_kind) != 1 or raw_kind[0] not in BY_KIND:
        raise MessageError(f"unknown message kind {raw_kind[:8]!r}")
    cls = BY_KIND[raw_kind[0]]
    try:
        header = msgpack.unpackb(_bytes(parts[1]), raw=False, strict_map_key=False)
    except Exception as exc:
        raise MessageError(f"bad {cls.__name__} header: {exc}") from None
    if not isinstance(header, dict):
        raise MessageError(f"bad {cls.__name__} header: not a map")
    frames = parts[2:]
    try:
        return _build(cls, header, frames)
    except MessageError:
        raise
    except Exception as exc:
        raise MessageError(f"bad {cls.__name__}: {type(exc).__name__}: {exc}") from None


def _bytes(part: Any) -> bytes:
    return part.bytes if hasattr(part, "bytes") else bytes(part)


def _tensors(metas: Any, frames: list[Any]) -> list[torch.Tensor]:
    if not isinstance(metas, list) or len(metas) != len(frames):
        raise MessageError(f"{len(frames)} tensor frames for "
                           f"{len(metas) if isinstance(metas, list) else '?'} descriptions")
    return [frame_tensor(m, f) for m, f in zip(metas, frames)]


def _build(cls: type, h: dict[str, Any], frames: list[Any]) -> Message:
    if cls is RunUnit:
        _no_frames(cls, frames)
        plan_id = h["plan_id"]
        if h["plan"] is None and plan_id is None:
            raise MessageError("a RunUnit needs a plan or a plan id")
        return RunUnit(int(h["unit_id"]), None if h["plan"] is None else plan_from_wire(h["plan"]),
                       {int(k): [int(t) for t in v] for k, v in h["tokens"]},
                       {int(k): dict(v) for k, v in h["sampling"]}, bool(h["want_logits"]),
                       None if h["unit"] is None else unit_from_wire(h["unit"]),
                       None if plan_id is None else int(plan_id), bool(h.get("trace", False)),
                       bool(h.get("want_routing", False)))
    if cls is Data:
        if h["kind"] not in ("rows", "partial", "tensor", "page") or not isinstance(h["meta"], dict):
            raise MessageError(f"bad Data payload kind {h['kind']!r}")
        return Data(int(h["unit_id"]), int(h["node_id"]),
                    Payload(h["kind"], h["meta"], tuple(_tensors(h["tensors"], frames))),
                    _counts(h.get("counts")))
    if cls is UnitPart:
        logits = _tensors(h["logits"], frames)
        return UnitPart(int(h["unit_id"]), str(h["actor"]),
                        {int(k): int(v) for k, v in h["tokens"]},
                        dict(zip((int(k) for k in h["logit_keys"]), logits)),
                        {int(k): str(v) for k, v in h["errors"]},
                        {int(k): (float(lp), tuple((int(i), float(v)) for i, v in top))
                         for k, lp, top in h.get("logprobs", ())},
                        tuple((int(n), float(a), float(b)) for n, a, b in h.get("spans", ())),
                        tuple((int(n), float(t)) for n, t in h.get("arrivals", ())))
    _no_frames(cls, frames)
    names = [f.name for f in dataclasses.fields(cls)]
    if set(h) != set(names):
        raise MessageError(f"{cls.__name__} has fields {sorted(h)}, expected {names}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in h.items()}
    addresses = values.get("addresses")
    if cls is Peers and not (isinstance(addresses, dict) and all(
            isinstance(a, str) and isinstance(b, str) for a, b in addresses.items())):
        raise MessageError("Peers addresses must map names to addresses")
    msg = cls(**values)
    _check_types(msg)
    return msg  # type: ignore[no-any-return]


def _counts(counts: Any) -> tuple[int, ...] | None:
    """A Data's gate counts from the wire: None, or non-negative integers."""
    if counts is None:
        return None
    try:  # checked in C: a typed array takes integers only
        checked = array("q", counts) if isinstance(counts, list) else None
    except (TypeError, OverflowError):
        checked = None
    if checked is None or (checked and min(checked) < 0):
        raise MessageError(f"bad Data counts {counts!r}: expected non-negative integers")
    return tuple(checked)


def _no_frames(cls: type, frames: list[Any]) -> None:
    if frames:
        raise MessageError(f"{cls.__name__} carries no tensors, got {len(frames)} frames")


_FIELD_TYPES = {"actor": str, "data_address": str, "pid": int, "unit_id": int, "node_id": int,
                "layer": int, "time": float, "error": str, "num_done": int,
                "running_s": float}


def _check_types(msg: Any) -> None:
    for f in dataclasses.fields(msg):
        want = _FIELD_TYPES.get(f.name)
        value = getattr(msg, f.name)
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            continue
        if want is not None and (not isinstance(value, want) or isinstance(value, bool)):
            raise MessageError(f"{type(msg).__name__}.{f.name} must be {want.__name__}, "
                               f"got {value!r}")
    for name in ("seq_ids", "unit_ids", "counts", "plan_ids"):
        if hasattr(msg, name) and not all(isinstance(v, int) for v in getattr(msg, name)):
            raise MessageError(f"{type(msg).__name__}.{name} must hold integers")
    dropped = getattr(msg, "dropped", {})
    if not (isinstance(dropped, dict) and all(
            isinstance(k, str) and isinstance(v, int) for k, v in dropped.items())):
        raise MessageError(f"{type(msg).__name__}.dropped must map reasons to counts")
