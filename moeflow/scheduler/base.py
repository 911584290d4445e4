"""The scheduler contract: what a scheduling policy is, and what it sees.

A scheduler is a pure, synchronous object: no I/O, no asyncio, no devices, no torch. The
engine calls it with plain data and runs what it returns on whichever executor is in use
(in-process, actor processes, or the simulator); a policy never knows which.

    form_units(waiting, running, budget) -> [Unit]
        Admission and batching. `running` are idle requests with KV on some device (those
        in a unit still in flight are not offered), in the order they were admitted;
        `waiting` have no KV yet, in arrival order (a preempted request first). The engine
        calls this whenever work may start: on arrivals and whenever a unit finishes.
        Return the units to run now, each a tuple of SeqChunks: which
        sequences advance, by how many tokens, and on which home device (where their
        attention runs and their KV cache lives). A running request keeps its home. Stay
        within `budget`: at most `max_tokens` new tokens and `max_seqs` sequences over all
        returned units, and no more new KV blocks on a device than `free_kv_blocks[device]`.

    plan(unit, model, cluster) -> Plan
        Cutting, placement and ordering: compile the unit's graph (`moeflow.dataflow.
        compile` with the cut the policy wants) and give every node an actor and a stream,
        and every stream its rule (InOrder or ByPriority).

    on_routing(unit, layer, counts, groups) -> {expert group: kernel} | None   (optional)
        A local decision made when a layer's gate counts are known. A plan's routed Experts
        that read the rows of the same gates (all of a layer's, unless the plan cuts the
        layer's tokens into micro-batches with a gate each) are asked about together:
        `counts` are the rows those gates routed to each expert (by expert id), `groups`
        the expert groups (`Expert.experts`) of those Experts. The one execution semantics
        calls it once per plan and such set of Experts, when the first of them it runs
        becomes ready, in every executor at the same point (each actor process calls its
        own copy of the scheduler, pickled to it when it starts, for the Experts it runs).
        Return, for some of `groups`, the kernel to run them with: `GROUPED` (one grouped
        call over the group's experts) or `DENSE` (a dense matmul per expert); groups left
        out, or None, leave the choice to the executor. Nodes of several units coalesced
        into one kernel run on their first member's choice. A kernel never changes
        results. Keep it cheap: it runs on the critical path, once per layer.

    reserved_weights(model, cluster) -> {device: parameters}   (optional)
        Room for weights a device holds beyond the experts the placement gives it: buffers
        that weight pages stream into (cgopipe's double buffer). The simulator sets it
        aside beside the device's weights, before the KV cache.

    kv_devices(model, cluster) -> {home: device}   (optional)
        Where the requests served by a home keep their KV cache, where that is not the home
        itself (cgopipe's host). The simulator sizes and charges KV memory there.

    plan_key(unit) -> Hashable | None   (optional)
        Units with equal keys get the same plan: the engine compiles it once and replays
        it, binding only the unit (sequence ids, starts, token counts) per step. Return
        None (the default) if your plans depend on more than you can key; `unit_shape`
        is the key of a plan that depends only on each sequence's home, logits and phase.

Subclass `Scheduler`, give it a `name`, and register it through the `moeflow.schedulers`
entry-point group, or name it as "module:Class". `moeflow.testing.check_scheduler(cls)`
runs the invariant suite on it.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from moeflow.dataflow.graph import Placement, Unit
from moeflow.models.spec import ModelSpec
from moeflow.scheduler.plan import Plan

# the kernels an `on_routing` may choose for a routed Expert group
GROUPED = "grouped"
DENSE = "dense"
KERNELS = (GROUPED, DENSE)


@dataclass(frozen=True, slots=True)
class RequestView:
    """What a scheduler sees of a request: counts and times, never tokens or tensors."""

    seq_id: int
    num_prompt_tokens: int
    num_computed: int  # tokens already in its KV cache
    num_output: int  # tokens generated so far
    max_new_tokens: int
    arrival: float
    home: str | None = None  # set once it runs

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens: the length its KV will reach once caught up."""
        return self.num_prompt_tokens + self.num_output

    @property
    def num_pending(self) -> int:
        """Tokens not yet in its KV cache: 1 while decoding, more while prefilling (or
        recomputing after a preemption)."""
        return self.num_tokens - self.num_computed


@dataclass(frozen=True, slots=True)
class Budget:
    """Limits of one scheduling call: the tokens and sequences all returned units may hold
    together (what units still in flight leave of the engine's limits), free KV-cache
    blocks of `kv_block_size` tokens on each device that can home requests, and how many
    units are in flight (their sequences are not offered again until they finish)."""

    max_tokens: int
    max_seqs: int
    free_kv_blocks: dict[str, int] = field(default_factory=dict)
    kv_block_size: int = 16
    units_in_flight: int = 0


@dataclass(frozen=True, slots=True)
class Cluster:
    """The devices a plan may use and where the routed experts live."""

    devices: tuple[str, ...]
    placement: Placement

    @staticmethod
    def sharded(devices: Sequence[str], num_experts: int) -> Cluster:
        devs = tuple(devices)
        return Cluster(devs, Placement.sharded(devs, num_experts))


class Scheduler:
    """Base class of scheduling policies; see the module docstring for the contract."""

    name: ClassVar[str] = ""

    def form_units(self, waiting: Sequence[RequestView], running: Sequence[RequestView],
                   budget: Budget) -> list[Unit]:
        raise NotImplementedError

    def plan(self, unit: Unit, model: ModelSpec, cluster: Cluster) -> Plan:
        raise NotImplementedError

    def on_routing(self, unit: Unit, layer: int, counts: tuple[int, ...],
                   groups: tuple[tuple[int, ...], ...]) -> dict[tuple[int, ...], str] | None:
        return None

    def plan_key(self, unit: Unit) -> Hashable | None:
        return None

    def reserved_weights(self, model: ModelSpec, cluster: Cluster) -> dict[str, int]:
        return {}

    def kv_devices(self, model: ModelSpec, cluster: Cluster) -> dict[str, str]:
        return {}


def routes(scheduler: Scheduler) -> bool:
    """Whether a scheduler has an `on_routing` of its own."""
    return type(scheduler).on_routing is not Scheduler.on_routing


def checked_adjustments(adjustments: object, groups: tuple[tuple[int, ...], ...]
                        ) -> dict[tuple[int, ...], str] | None:
    """What an `on_routing` returned, checked: None, or {one of `groups`: GROUPED or
    DENSE}."""
    if adjustments is None:
        return None
    if not isinstance(adjustments, dict):
        raise TypeError(f"on_routing must return a dict or None, got "
                        f"{type(adjustments).__name__}")
    for group, kernel in adjustments.items():
        if group not in groups:
            raise ValueError(f"on_routing: {group!r} is not one of the layer's expert groups "
                             f"{list(groups)}")
        if kernel not in KERNELS:
            raise ValueError(f"on_routing: unknown kernel {kernel!r} for experts {group}; "
                             f"expected one of {', '.join(KERNELS)}")
    return adjustments


def unit_shape(unit: Unit) -> tuple[tuple[str, str, str], ...]:
    """What a graph's structure depends on, per sequence in order: its home, which logits
    it wants, and its phase (one new token after a prefix: decode; else prefill)."""
    return tuple((s.home, s.logits, "decode" if s.num_tokens == 1 and s.start > 0
                  else "prefill") for s in unit.seqs)
