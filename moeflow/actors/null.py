"""NullWorker: a device that runs every node instantly and computes nothing.

It stands in for a DeviceWorker (the same `begin`/`end`/`abort`/`release`/`run_group`) and
returns values of the right kinds, so that the whole path above it runs for real: the
semantics, the actor core, the executors, transports and the engine. What remains of a
step's time is the runtime's own cost per node, which `benchmarks/engine.py` measures.

Routing is fixed: token t of a unit goes to experts (t·A + a) mod E for a in 0..A-1, so
every expert sees rows and every transfer carries some. Logits are zero: greedy sampling
always picks token 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moeflow.actors.kvcache import PagedKVCache
from moeflow.actors.values import Inputs, Logits, Page, Partial, Routing, Rows
from moeflow.dataflow.graph import FAN_PAYLOADS, Gate, Graph, LMHead, Node, Transfer, Unit
from moeflow.dataflow.kinds import KINDS
from moeflow.models.spec import ModelSpec
from moeflow.ops.backend import index_tensor

NULL = torch.empty(0)  # the value of every node whose value nobody reads
# a transfer's, in the codec its payload is declared to travel in (moeflow.dataflow.kinds)
_NULL_SENT = {"tensor": NULL, "rows": Rows("", 0, torch.empty(0, 0),
                                          torch.empty(0, dtype=torch.int32), NULL),
              "partial": Partial(0, torch.empty(0, 0))}
_TRAVELS_AS = KINDS[Transfer].travels
NULL_VOCAB = 8  # columns of the zero logits: enough to sample from


@dataclass
class _NullUnit:
    unit: Unit
    counts: tuple[int, ...]  # rows per expert, for every Gate of the unit here
    logits: dict[tuple[int, ...], Logits]  # per LMHead's seqs
    kv_seqs: tuple[int, ...] = ()  # those whose KV it reserved


class NullWorker:
    def __init__(self, device: str, spec: ModelSpec, kv_tokens: int = 65536,
                 serves: bool = True) -> None:
        self.device = device
        self.tdevice = torch.device("cpu")
        self.spec = spec
        self.dense = object() if serves else None  # serving actors hold dense weights
        # the real bookkeeping of KV blocks, over one-element slots
        self.kv = PagedKVCache(1, 1, torch.float32, kv_tokens)
        self._units: dict[Any, _NullUnit] = {}

    def begin(self, key: Any, unit: Unit, token_ids: dict[int, list[int]], *,
              seqs: tuple[int, ...] | None = None, kv: bool = True) -> None:
        moe = self.spec.moe
        counts = [0] * moe.num_experts
        homed = unit.seqs_on(self.device) if seqs is None else tuple(seqs)
        for t in range(sum(unit.seqs[i].num_tokens for i in homed) * moe.top_k):
            counts[t % moe.num_experts] += 1
        if kv:  # the slots as one tensor, as a DeviceWorker lays them out
            index_tensor([slot for i in homed for slot in self.kv.reserve_slots(
                unit.seqs[i].seq_id, unit.seqs[i].start, unit.seqs[i].num_tokens)])
        self._units[key] = _NullUnit(unit, tuple(counts), {}, homed if kv else ())

    def end(self, key: Any) -> None:
        self._units.pop(key, None)

    def abort(self, key: Any) -> None:
        state = self._units.pop(key, None)
        if state is None:
            return
        for i in state.kv_seqs:
            self.kv.rollback(state.unit.seqs[i].seq_id, state.unit.seqs[i].start)

    def release(self, seq_id: int) -> None:
        self.kv.free(seq_id)

    def run_group(self, items: list[tuple[Any, Graph, Node, Inputs]],
                  kernel: str | None = None) -> list[Any]:
        return [self._value(key, graph, node) for key, graph, node, _ in items]

    def _value(self, key: Any, graph: Graph, node: Node) -> Any:
        if isinstance(node, Gate):
            state = self._units[key]
            return Routing(NULL, NULL, NULL, [], NULL, state.counts)
        if isinstance(node, LMHead):
            state = self._units[key]
            # the bound unit's, as DeviceWorker; a micro-batch's own
            seqs = node.seqs if graph.micro_batched else state.unit.seqs_on(self.device)
            logits = state.logits.get(seqs)
            if logits is None:
                rows = tuple(state.unit.seqs[i].num_logit_rows for i in seqs)
                logits = state.logits[seqs] = Logits(
                    seqs, rows, torch.zeros(sum(rows), NULL_VOCAB))
            return logits
        if isinstance(node, Transfer):
            codec = _TRAVELS_AS[node.payload]
            value = (Page(node.experts, *(torch.empty(len(node.experts), 0, 0),) * 2)
                     if codec == "page" else _NULL_SENT[codec])
            # a dispatch or combine: a part per destination
            return (value,) * len(node.dsts) if node.payload in FAN_PAYLOADS else value
        return NULL
