"""batch-ep: conventional expert parallelism, the baseline every policy is compared to.

- Routed experts are sharded over the devices; attention is replicated, and each device
  serves the requests homed on it (new requests go to the device serving the fewest).
- Every step batches all running requests (one step at a time), plus as many waiting ones (first come, first
  served) as the token, sequence and KV budgets allow, into one unit. Long prompts are
  prefilled in chunks.
- Per layer: attention -> gate -> all-to-all dispatch -> experts -> all-to-all combine, with
  a barrier at every layer: no device starts layer l+1 before all devices finished l.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from moeflow.dataflow.compiler import Cut, compile
from moeflow.dataflow.graph import SeqChunk, Unit
from moeflow.models.spec import ModelSpec
from moeflow.scheduler.base import Budget, Cluster, RequestView, Scheduler
from moeflow.scheduler.plan import Plan, topological_plan
from moeflow.scheduler.requests import blocks_for


class BatchEP(Scheduler):
    name = "batch-ep"

    def form_units(self, waiting: Sequence[RequestView], running: Sequence[RequestView],
                   budget: Budget) -> list[Unit]:
        if budget.units_in_flight:
            return []  # one batch step at a time
        free = dict(budget.free_kv_blocks)
        load = {d: 0 for d in free}
        for r in running:
            if r.home in load:
                load[r.home] += 1
        chunks: list[SeqChunk] = []
        tokens_left = budget.max_tokens
        most = self.chunk_limit(waiting, running, budget)
        for r in running:
            if tokens_left <= 0 or len(chunks) >= budget.max_seqs:
                break
            chunk = advance(r, r.home, min(tokens_left, most), free, budget.kv_block_size)
            if chunk is not None:
                chunks.append(chunk)
                tokens_left -= chunk.num_tokens
        for r in waiting:
            if tokens_left <= 0 or len(chunks) >= budget.max_seqs or not load:
                break
            home = min(load, key=lambda d: (load[d], -free[d]))
            chunk = advance(r, home, min(tokens_left, most), free, budget.kv_block_size)
            if chunk is None:
                break  # first come, first served: do not let later requests overtake
            chunks.append(chunk)
            load[home] += 1
            tokens_left -= chunk.num_tokens
        return [Unit(tuple(chunks))] if chunks else []

    def chunk_limit(self, waiting: Sequence[RequestView], running: Sequence[RequestView],
                    budget: Budget) -> int:
        """The most tokens of one sequence a unit takes (a prompt longer is prefilled in
        chunks): all of the budget."""
        return budget.max_tokens

    def plan_key(self, unit: Unit) -> Hashable:
        # the graph's structure depends only on which devices serve the unit; its sequences,
        # their token counts and logits are bound per step
        return frozenset(s.home for s in unit.seqs)

    def plan(self, unit: Unit, model: ModelSpec, cluster: Cluster) -> Plan:
        return topological_plan(compile(model, unit, cluster.placement, Cut(barrier=True)))


def advance(r: RequestView, home: str | None, tokens_left: int, free: dict[str, int],
            block_size: int) -> SeqChunk | None:
    """The next chunk of `r` on `home`, as long as its KV fits, charging the blocks it
    takes to `free`; None if not even one token fits."""
    if home is None or home not in free:
        return None
    room = free[home] * block_size + (-r.num_computed) % block_size
    n = min(r.num_pending, tokens_left, room)
    if n <= 0:
        return None
    free[home] -= (blocks_for(r.num_computed + n, block_size)
                   - blocks_for(r.num_computed, block_size))
    caught_up = r.num_computed + n == r.num_tokens
    return SeqChunk(r.seq_id, r.num_computed, n, home, "last" if caught_up else "none")
