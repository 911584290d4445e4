"""Plans compiled once per unit shape and replayed.

A scheduler's plan depends on the shape of a unit, not on the values that change every
step: which sequences it holds, how many tokens and how much context each has. A scheduler
that knows this says so with `plan_key(unit)`: units with equal keys share one plan, and
only the unit itself (sequence ids, starts, token counts) is bound to it per step. The
real executors read every per-step figure from the bound unit, never from the cached
plan's graph, whose `unit` is the one it was first compiled for.

    cache = PlanCache(capacity=256)
    plan_id, plan = cache.plan(scheduler, unit, model, cluster)
    cache.take_evicted() -> [plan_id]     plans the executors may drop now

The cache holds at most `capacity` plans, evicting the least recently used. Plan ids are
unique in the process, across caches, and never reused, so a message naming one finds that
plan or nothing, never another.
The simulator does not cache: its cost model reads each graph's own sizes.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Hashable

from moeflow.dataflow.graph import Unit
from moeflow.models.spec import ModelSpec
from moeflow.scheduler.base import Cluster, Scheduler
from moeflow.scheduler.plan import Plan

DEFAULT_CAPACITY = 256
# one sequence for every cache in the process: an executor outlives an engine's cache (a
# test, a restarted engine), and its actors must never mistake one cache's plan for another's
_PLAN_IDS = itertools.count()


class PlanError(ValueError):
    """A scheduler planned a different unit than it was given."""


class PlanCache:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"a plan cache holds at least 1 plan, got capacity {capacity}")
        self.capacity = capacity
        self._plans: OrderedDict[Hashable, tuple[int, Plan]] = OrderedDict()
        self._ids = _PLAN_IDS
        self._evicted: list[int] = []
        self.num_hits = 0
        self.num_compiled = 0

    def plan(self, scheduler: Scheduler, unit: Unit, model: ModelSpec, cluster: Cluster
             ) -> tuple[int | None, Plan]:
        """(plan id, plan) for `unit`: the cached plan of its shape, or a new one (whose id
        is None when the scheduler does not let its plans be shared)."""
        key = scheduler.plan_key(unit)
        if key is not None:
            key = (scheduler.name, cluster, key)
            cached = self._plans.get(key)
            if cached is not None:
                self._plans.move_to_end(key)
                self.num_hits += 1
                return cached
        plan = scheduler.plan(unit, model, cluster)
        if plan.graph.unit != unit:
            raise PlanError(f"scheduler {scheduler.name!r} planned a different unit than it "
                            f"formed")
        self.num_compiled += 1
        if key is None:
            return None, plan
        entry = (next(self._ids), plan)
        self._plans[key] = entry
        if len(self._plans) > self.capacity:
            _, (old_id, _) = self._plans.popitem(last=False)
            self._evicted.append(old_id)
        return entry

    def take_evicted(self) -> list[int]:
        evicted, self._evicted = self._evicted, []
        return evicted

    def __len__(self) -> int:
        return len(self._plans)
