"""The in-process executor: every virtual device's DeviceWorker in this process, Plans run
one node at a time through the shared execution semantics.

This is the embedded default and the reference the other executors are checked against.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from moeflow.actors.worker import DeviceWorker, Logits, Routing
from moeflow.dataflow.graph import Gate, LMHead, Placement, Transfer
from moeflow.models.checkpoint import Checkpoint
from moeflow.models.spec import ModelSpec
from moeflow.models.weights import WeightLoader
from moeflow.scheduler.plan import Plan, Stream
from moeflow.scheduler.semantics import Execution


def parse_devices(devices: str | Sequence[str]) -> tuple[str, ...]:
    """'cpu:0,cpu:1' or ['cpu:0', 'cpu:1'] -> ('cpu:0', 'cpu:1'), checked."""
    items = devices.split(",") if isinstance(devices, str) else list(devices)
    names = tuple(d.strip() for d in items if d.strip())
    if not names:
        raise ValueError("at least one device is needed, e.g. 'cpu:0'")
    for name in names:
        kind, _, index = name.partition(":")
        if kind not in ("cpu", "cuda") or not index.isdigit():
            raise ValueError(f"bad device {name!r}: expected 'cpu:N' or 'cuda:N'")
    if len(set(names)) != len(names):
        raise ValueError(f"device listed twice in {','.join(names)}")
    return names


def load_workers(model_dir: str | Path, spec: ModelSpec, placement: Placement,
                 dtype: torch.dtype, kv_tokens: int) -> dict[str, DeviceWorker]:
    """One worker per placement device. Virtual devices in one process share the dense
    weights (one copy) and each stacks only the experts it owns."""
    loader = WeightLoader(spec, Checkpoint(model_dir), dtype)
    dense = loader.dense()
    workers = {}
    for device in placement.devices:
        owned = placement.experts_of(device)
        experts = {layer: loader.experts(layer, owned) for layer in spec.moe_layers} \
            if owned else {}
        workers[device] = DeviceWorker(device, spec, dtype, dense, experts, kv_tokens)
    return workers


Observer = Callable[[Plan, int, Stream], None]


class InProcessExecutor:
    """`observer(plan, node_id, stream)`, if given, is called as each node runs."""

    def __init__(self, workers: dict[str, DeviceWorker], observer: Observer | None = None,
                 record_routing: bool = False) -> None:
        self.workers = workers
        self.observer = observer
        self._keys = itertools.count()
        # layer -> rows routed to each expert, summed over every gate run (if recording)
        self.routing: dict[int, list[int]] | None = {} if record_routing else None

    @property
    def kv_block_size(self) -> int:
        return next(iter(self.workers.values())).kv.block_size

    def kv_capacity_blocks(self) -> dict[str, int]:
        """KV-cache blocks each device that serves requests can hold."""
        return {d: w.kv.max_blocks for d, w in self.workers.items() if w.dense is not None}

    def free_kv_blocks(self) -> dict[str, int]:
        """Blocks each serving device could still hand out (for checks)."""
        return {d: w.kv.num_free_blocks for d, w in self.workers.items() if w.dense is not None}

    def run(self, plan: Plan, token_ids: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        """Run one unit's plan. `token_ids` maps each unit sequence index to its new tokens.
        Returns logits per unit sequence index ([rows, V], fp32)."""
        return self.run_many([(plan, token_ids)])[0]

    def run_many(self, jobs: list[tuple[Plan, dict[int, list[int]]]]
                 ) -> list[dict[int, torch.Tensor]]:
        """Run several units' plans together (their nodes interleave on shared streams)."""
        keys = [next(self._keys) for _ in jobs]
        begun: list[tuple[Any, DeviceWorker]] = []
        try:
            for key, (plan, tokens) in zip(keys, jobs):
                for home in plan.graph.unit.homes(plan.graph.placement.devices):
                    worker = self.workers[home]
                    worker.begin(key, plan.graph.unit, tokens)
                    begun.append((key, worker))
            results = self._execute(keys, [plan for plan, _ in jobs])
        except BaseException:
            for key, worker in begun:
                worker.abort(key)
            raise
        for key, worker in begun:
            worker.end(key)
        return results

    def _execute(self, keys: list[Any], plans: list[Plan]) -> list[dict[int, torch.Tensor]]:
        execution = Execution(plans)
        values: list[dict[int, Any]] = [{} for _ in plans]
        uses: list[list[int]] = []
        for p in plans:
            count = [0] * len(p.graph.nodes)
            for edge in p.graph.edges:
                if edge.kind == "data":
                    count[edge.src] += 1
            uses.append(count)
        results: list[dict[int, torch.Tensor]] = [{} for _ in plans]
        for index, node_id in execution.run_in_order():
            plan = plans[index]
            graph = plan.graph
            node = graph.nodes[node_id]
            store = values[index]
            inputs = [(graph.nodes[p], store[p]) for p in graph.inputs(node_id)]
            stream = plan.assignment[node_id]
            if self.observer is not None:
                self.observer(plan, node_id, stream)
            worker = self.workers[node.src if isinstance(node, Transfer) else stream.actor]
            out = worker.run(keys[index], graph, node, inputs)
            for p in graph.inputs(node_id):  # drop values nobody else will read
                uses[index][p] -= 1
                if uses[index][p] == 0:
                    del store[p]
            if isinstance(node, LMHead):
                _collect(out, results[index])
            else:
                store[node_id] = out
            counts = out.counts if isinstance(node, Gate) and isinstance(out, Routing) else None
            if counts is not None and self.routing is not None:
                total = self.routing.setdefault(node.layer, [0] * len(counts))
                for e, c in enumerate(counts):
                    total[e] += c
            execution.finish((index, node_id), counts)
        return results

    def release(self, home: str, seq_id: int) -> None:
        self.workers[home].release(seq_id)


def _collect(out: Logits, into: dict[int, torch.Tensor]) -> None:
    row = 0
    for seq, n in zip(out.seqs, out.rows_per_seq):
        if n:  # a prefill chunk that does not reach the prompt's end has no logits
            into[seq] = out.values[row:row + n]
        row += n
