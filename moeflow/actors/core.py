"""ActorCore: the synchronous logic of one actor, whatever transport carries its messages.

An actor owns one device's DeviceWorker (its weights, the KV cache of the requests it
serves) and runs the one execution semantics over every unit's whole plan, starting only
the nodes on its own streams:

    handle(msg) -> [Outgoing]      RunUnit admits a unit; Data and Done finish another
                                   actor's node here; Release / Abort free state
    start_tasks() -> [Group]       start what each of its idle streams may start now: a
                                   node, or nodes coalesced into one kernel
    run(group) -> [value]          run one (the shell decides on which thread)
    finish(task, value) -> [Outgoing]
        A finished Transfer becomes a Data message to each destination actor (a
        dispatch or combine to several sends each its own part); any other
        node whose successor lives on another actor becomes a Done notice to it. A
        finished LMHead is sampled for the requests this actor homes. When every node of a
        unit that runs here is done, a UnitPart (token ids, no tensors unless asked) goes
        to the coordinator.

What a node means here (its inputs, whom its completion concerns) is worked out once per
plan, in a `Program`: a cached plan replays it for every unit of its shape.

With a scheduler's `on_routing`, the semantics asks it for a layer's kernel choice once the
counts of that layer are known here: from the gates this actor runs, and from the counts a
peer's dispatch Data carries; a routed Expert group then runs on the kernel it chose.

A RunUnit marked `trace` has its node groups timed as they run, and the arrival of every
other actor's node it hears of; both go back with the UnitPart (moeflow.actors.tracing).

Messages for a unit that arrive before its RunUnit (a fast peer) wait until it does.
Nothing here does I/O or knows about threads: the in-process transport calls it directly,
the ZeroMQ actor process from its async shell.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from moeflow.actors.messages import (
    Abort, Data, Done, DropPlans, Message, MessageError, NodeFailed, Release, RoutingCounts, RunUnit,
    UnitPart,
)
from moeflow.actors.values import (
    Inputs, Logits, Routing, from_payload, payload_to, to_payload,
)
from moeflow.actors.worker import DeviceWorker
from moeflow.dataflow.graph import FAN_PAYLOADS, Attention, Gate, LMHead, Node, Transfer, Unit
from moeflow.dataflow.kinds import KINDS
from moeflow.scheduler.base import checked_adjustments
from moeflow.scheduler.plan import Plan, Stream
from moeflow.scheduler.semantics import Execution, Group, SemanticsError, Task
from moeflow.ops.sampling import (
    Logprobs, SamplingError, SamplingParams, greedy_tokens, make_generator, sample, seed_draw,
    token_logprobs,
)

COORDINATOR = ""  # destination name of messages for the coordinator
# what a peer can make an actor hold for units not admitted yet, in messages and in bytes;
# beyond either, the oldest unit's messages are dropped (and counted)
EARLY_LIMIT = 4096
EARLY_BYTES = 64 << 20
log = logging.getLogger("moeflow.actor")


@dataclass(frozen=True)
class Outgoing:
    to: str  # an actor's name, or COORDINATOR
    msg: Message


# what finishing a node does with its value
KEEP, SEND, SAMPLE = 0, 1, 2
TRAVELS_AS = KINDS[Transfer].travels  # payload -> the codec it is declared to travel in


@dataclass(frozen=True, slots=True)
class Step:
    """One node of a plan as this actor runs it."""

    node: Node
    inputs: tuple[int, ...]  # nodes whose values it reads, in edge order
    roles: tuple[tuple[str, tuple[tuple[Node, int], ...]], ...]  # the same, by role
    effect: int  # KEEP its value for local successors, SEND it (a Transfer out), or SAMPLE
    notify: tuple[str, ...]  # other actors waiting on it with no data: told by Done
    gate: bool
    dispatch: bool  # a dispatch to another actor: its Data carries the gate's counts
    dsts: tuple[str, ...]  # SEND: the actors it goes to
    fan: bool  # its value is a part per destination (a dispatch or combine)
    codec: str = ""  # SEND: the codec its payload's kind declares it travels in


class Program:
    """A plan compiled for one actor, once: a Step per node it runs (None for the others')."""

    def __init__(self, plan: Plan, actor: str) -> None:
        graph = plan.graph
        steps: list[Step | None] = []
        for node in graph.nodes:
            if plan.assignment[node.id].actor != actor:
                steps.append(None)
                continue
            inputs = graph.inputs(node.id)
            roles = tuple((role, tuple((graph.nodes[p], p) for p in ids))
                          for role, ids in graph.roles(node.id).items())
            dsts = node.dsts if isinstance(node, Transfer) else ()
            sends = bool(dsts) and dsts != (actor,)
            effect = SEND if sends else SAMPLE if isinstance(node, LMHead) else KEEP
            told = set(dsts)
            notify = []
            for succ in graph.succs(node.id):
                other = plan.assignment[succ].actor
                if other != actor and other not in told:
                    told.add(other)
                    notify.append(other)
            payload = node.payload if isinstance(node, Transfer) else ""
            steps.append(Step(node, inputs, roles, effect, tuple(notify), isinstance(node, Gate),
                              sends and payload == "dispatch", dsts,
                              bool(dsts) and payload in FAN_PAYLOADS,
                              TRAVELS_AS[payload] if sends else ""))
        self.plan = plan
        self.steps = tuple(steps)
        # per node: 0 on a stream the plan runs first when one thread runs every stream
        lead = set(plan.lead)
        self.rank = tuple(0 if s.name in lead else 1 for s in plan.assignment)
        # sequences whose KV lives here: where their attention (or its core, or a
        # prefill's store) runs; a device that runs a sequence's projections with its KV
        # elsewhere lays it out without KV (CGOPipe's GPU and host)
        kv = {i for node in graph.nodes if isinstance(node, Attention) and node.part in
              ("full", "core", "store") and plan.assignment[node.id].actor == actor
              for i in node.seqs}
        self.kv_seqs: tuple[int, ...] | None = tuple(sorted(kv)) if any(
            isinstance(n, Attention) and n.part != "full" for n in graph.nodes) else None


@dataclass
class _Unit:
    unit_id: int
    index: int  # the plan's index in the actor's Execution
    msg: RunUnit
    plan: Plan
    program: Program
    bound: Unit  # what runs: the plan may be cached from another unit of the same shape
    values: dict[int, Any] = field(default_factory=dict)
    uses: list[int] = field(default_factory=list)
    tokens: dict[int, int] = field(default_factory=dict)
    logits: dict[int, torch.Tensor] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)  # unit seq index -> why
    logprobs: dict[int, Logprobs] = field(default_factory=dict)  # for requests that ask
    homed: bool = False
    # traced units only (RunUnit.trace): see UnitPart.spans and UnitPart.arrivals
    spans: list[tuple[int, float, float]] | None = None
    arrivals: list[tuple[int, float]] | None = None


OnRouting = Callable[[Unit, int, tuple[int, ...], tuple[tuple[int, ...], ...]],
                     "dict[tuple[int, ...], str] | None"]


class ActorCore:
    def __init__(self, name: str, worker: DeviceWorker, on_routing: OnRouting | None = None
                 ) -> None:
        self.name = name
        self.worker = worker
        self.on_routing = on_routing  # a scheduler's, bound
        self.execution = Execution(on_routing=None if on_routing is None else self._routing)
        self.units: dict[int, _Unit] = {}
        self.by_index: dict[int, _Unit] = {}
        self.early: dict[int, list[Message]] = {}  # unit id -> messages before its RunUnit
        self.early_bytes: dict[int, int] = {}  # unit id -> bytes of its early messages
        self.dropped: dict[str, int] = {}  # messages dropped, by reason
        self.samplers: dict[int, tuple[SamplingParams, torch.Generator | None]] = {}
        # cached plans, by id, until the coordinator drops them
        self.plans: dict[int, Program] = {}

    # -- messages ------------------------------------------------------------------

    def handle(self, msg: Message) -> list[Outgoing]:
        if isinstance(msg, RunUnit):
            return self._admit(msg)
        if isinstance(msg, (Data, Done)):
            unit = self.units.get(msg.unit_id)
            if unit is None:
                self._hold(msg)
                return []
            return self._arrive(unit, msg)
        if isinstance(msg, Release):
            for seq_id in msg.seq_ids:
                self.worker.release(seq_id)
                self.samplers.pop(seq_id, None)
            return []
        if isinstance(msg, Abort):
            for unit_id in msg.unit_ids:
                self.abort(unit_id)
            return []
        if isinstance(msg, DropPlans):
            for plan_id in msg.plan_ids:
                self.plans.pop(plan_id, None)
            return []
        log.warning("%s: ignoring a %s message", self.name, type(msg).__name__)
        return []

    def _hold(self, msg: Data | Done) -> None:
        for unit_id in [u for u in self.early_bytes if u not in self.early]:
            del self.early_bytes[unit_id]  # admitted or aborted since
        self.early.setdefault(msg.unit_id, []).append(msg)
        self.early_bytes[msg.unit_id] = self.early_bytes.get(msg.unit_id, 0) + _size(msg)
        while self.early and (sum(len(v) for v in self.early.values()) > EARLY_LIMIT
                              or sum(self.early_bytes.values()) > EARLY_BYTES):
            oldest = next(iter(self.early))
            num = self.count_drop("early_overflow", len(self.early[oldest]))
            if num & (num - 1) == 0:  # the 1st, 2nd, 4th, ...: a flood does not flood the log
                log.warning("%s: dropped %d messages (%d bytes) for unit %d, never admitted "
                            "(%d so far)", self.name, len(self.early[oldest]),
                            self.early_bytes[oldest], oldest, num)
            del self.early[oldest], self.early_bytes[oldest]

    def count_drop(self, reason: str, num: int = 1) -> int:
        """Count `num` messages dropped for `reason`; the count so far."""
        total = self.dropped[reason] = self.dropped.get(reason, 0) + num
        return total

    def owns(self, stream: Stream) -> bool:
        return stream.actor == self.name

    def _admit(self, msg: RunUnit) -> list[Outgoing]:
        if msg.unit_id in self.units:
            log.warning("%s: unit %d admitted twice; ignored", self.name, msg.unit_id)
            return []
        unit_id = msg.unit_id
        program = None if msg.plan_id is None else self.plans.get(msg.plan_id)
        if program is None or (msg.plan is not None and program.plan is not msg.plan):
            if msg.plan is None:
                return [Outgoing(COORDINATOR, NodeFailed(
                    unit_id, self.name, f"unknown plan {msg.plan_id}"))]
            try:  # a node with an input it has no role for, say: the unit fails
                program = Program(msg.plan, self.name)
            except Exception as exc:
                return [Outgoing(COORDINATOR, NodeFailed(
                    unit_id, self.name, f"{type(exc).__name__}: {exc}"))]
            if msg.plan_id is not None:
                self.plans[msg.plan_id] = program
        plan = program.plan
        graph = plan.graph
        bound = graph.unit if msg.unit is None else msg.unit
        homed = bool(bound.seqs_on(self.name))
        kv_seqs = program.kv_seqs
        # samplers live where the logits are sampled, the request's home, and are released
        # there with its KV cache; made before anything is reserved, so that a request's
        # bad parameters fail its unit and leave nothing behind
        homes = {s.seq_id for s in bound.seqs if s.home == self.name}
        try:
            for seq_id, params in msg.sampling.items():
                if seq_id in homes and seq_id not in self.samplers:
                    p = SamplingParams(**params)
                    self.samplers[seq_id] = (p, make_generator(p))
        except Exception as exc:
            return [Outgoing(COORDINATOR, NodeFailed(
                unit_id, self.name, f"sampling parameters: {type(exc).__name__}: {exc}"))]
        try:
            if kv_seqs is not None:  # attention cut in parts: KV where their cores run
                homed = homed or bool(kv_seqs)
                if homed:
                    self.worker.begin(unit_id, bound, msg.tokens,
                                      seqs=kv_seqs or bound.seqs_on(self.name),
                                      kv=bool(kv_seqs))
            elif homed:
                self.worker.begin(unit_id, bound, msg.tokens)
        except Exception as exc:
            return [Outgoing(COORDINATOR, NodeFailed(unit_id, self.name, f"{exc}"))]
        index = self.execution.add(plan, owns=self.owns)
        unit = _Unit(unit_id, index, msg, plan, program, bound, uses=list(graph.data_uses),
                     homed=homed)
        if msg.trace:
            unit.spans, unit.arrivals = [], []
        self.units[unit_id] = unit
        self.by_index[index] = unit
        out: list[Outgoing] = []
        for early in self.early.pop(unit_id, []):
            try:
                out.extend(self._arrive(unit, early))
            except MessageError as exc:
                log.warning("%s: dropped a message for unit %d: %s", self.name, unit_id, exc)
            if unit_id not in self.units:  # it failed (on_routing raised): nothing more
                return out
        out.extend(self._maybe_done(unit))
        return out

    def _arrive(self, unit: _Unit, msg: Data | Done) -> list[Outgoing]:
        task = (unit.index, msg.node_id)
        graph = unit.plan.graph
        if not 0 <= msg.node_id < len(graph.nodes) or self.execution.owns(task):
            log.warning("%s: unit %d has no remote node %d; dropped", self.name,
                        unit.unit_id, msg.node_id)
            self.count_drop("bad_node")
            return []
        counts = None
        if isinstance(msg, Data):
            unit.values[msg.node_id] = payload_to(from_payload(msg.payload), self.worker.tdevice)
            counts = msg.counts
            if counts is not None and len(counts) != graph.placement.num_experts:
                return self.fail(task, MessageError(
                    f"node {msg.node_id} brought counts of {len(counts)} experts, the model "
                    f"has {graph.placement.num_experts}"))
        if unit.arrivals is not None:  # heard of now (or, if it came first, at admission)
            unit.arrivals.append((msg.node_id, time.monotonic()))
        try:
            self.execution.finish_external(task, counts)
        except SemanticsError as exc:  # a duplicate notice, say: drop it
            log.warning("%s: %s", self.name, exc)
            self.count_drop("duplicate")
        except Exception as exc:  # the scheduler's on_routing failed: so does the unit
            return self.fail(task, exc)
        return []

    # -- running nodes -------------------------------------------------------------

    def start_tasks(self) -> list[Group]:
        """Start what every idle stream may start now (a node, or a coalesced group of
        them) and return those groups, those on the plan's `lead` streams first (one
        thread runs every stream here). Run and finish each."""
        groups = self.execution.start_startable()
        if len(groups) > 1:
            by_index = self.by_index
            groups.sort(key=lambda g: by_index[g[0][0]].program.rank[g[0][1]])
        return groups

    def node_inputs(self, task: Task) -> tuple[Any, Inputs]:
        unit = self.by_index[task[0]]
        step = unit.program.steps[task[1]]
        assert step is not None, f"task {task} runs on another actor"
        values = unit.values
        inputs: Inputs = {}
        for role, read in step.roles:  # a loop, and one input without a comprehension:
            if len(read) == 1:  # ~0.2 us a node fewer (one node in a step takes ~8 us)
                n, p = read[0]
                inputs[role] = [(n, values[p])]
            else:
                inputs[role] = [(n, values[p]) for n, p in read]
        return step.node, inputs

    def run(self, group: Group) -> list[Any]:
        """Run a started node, or a coalesced group as one kernel; returns their values."""
        items = []
        traced = None  # (spans, node) of the group's traced units: none when untraced
        for task in group:
            unit = self.by_index[task[0]]
            node, inputs = self.node_inputs(task)
            items.append((unit.unit_id, unit.plan.graph, node, inputs))
            if unit.spans is not None:
                if traced is None:
                    traced = []
                traced.append((unit.spans, task[1]))
        # routed experts on the kernel on_routing chose (a coalesced group: its head's)
        kernel = None if self.on_routing is None else self.execution.kernel(group[0])
        if traced is None:
            return self.worker.run_group(items, kernel)
        start = time.monotonic()
        values = self.worker.run_group(items, kernel)
        end = time.monotonic()
        for spans, node_id in traced:  # a coalesced group's members share its span
            spans.append((node_id, start, end))
        return values

    def finish(self, task: Task, value: Any) -> list[Outgoing]:
        """Record a node's value and say who needs to know. A failure here fails the
        node's unit, never the actor."""
        unit = self.by_index.get(task[0])
        if unit is None or unit.unit_id not in self.units:  # aborted while running
            return []
        try:
            return self._finish(unit, task, value)
        except Exception as exc:
            return self.fail(task, exc)

    def _finish(self, unit: _Unit, task: Task, value: Any) -> list[Outgoing]:
        step = unit.program.steps[task[1]]
        assert step is not None, f"task {task} runs on another actor"
        node = step.node
        out: list[Outgoing] = []
        uses, values = unit.uses, unit.values
        # a dispatch tells its owner the gate's counts (for its on_routing), read before its
        # input may go
        sent_counts = (getattr(values.get(step.inputs[0]), "counts", None)
                       if step.dispatch and self.on_routing is not None else None)
        for p in step.inputs:
            uses[p] -= 1
            if uses[p] == 0:
                values.pop(p, None)
        if step.effect == KEEP:  # a transfer to its own device: its one part
            values[task[1]] = value[0] if step.fan else value
        elif step.effect == SEND:
            for dst, part in zip(step.dsts, value) if step.fan else ((step.dsts[0], value),):
                payload = to_payload(part)
                if payload.kind != step.codec:  # the kind's declaration (dataflow.kinds)
                    raise TypeError(f"{node!r} made a {payload.kind} value; its payload "
                                    f"travels as {step.codec}")
                out.append(Outgoing(dst, Data(unit.unit_id, task[1], payload, sent_counts)))
        else:
            self._sample(unit, value)
        counts = value.counts if step.gate and isinstance(value, Routing) else None
        if counts is not None and unit.msg.want_routing:  # asked only to record them
            out.append(Outgoing(COORDINATOR, RoutingCounts(unit.unit_id, node.layer,  # type: ignore[attr-defined]
                                                           counts)))
        for actor in step.notify:
            out.append(Outgoing(actor, Done(unit.unit_id, task[1])))
        self.execution.finish(task, counts)
        out.extend(self._maybe_done(unit))
        return out

    def _routing(self, index: int, layer: int, counts: tuple[int, ...],
                 groups: tuple[tuple[int, ...], ...]) -> dict[tuple[int, ...], str] | None:
        return checked_adjustments(self.on_routing(  # type: ignore[misc]
            self.by_index[index].bound, layer, counts, groups), groups)

    def fail(self, task: Task, error: BaseException) -> list[Outgoing]:
        unit = self.by_index.get(task[0])
        if unit is None or unit.unit_id not in self.units:
            return []
        log.error("%s: unit %d node %d failed: %r", self.name, unit.unit_id, task[1], error)
        self.abort(unit.unit_id)
        return [Outgoing(COORDINATOR, NodeFailed(unit.unit_id, self.name,
                                                 f"{type(error).__name__}: {error}"))]

    def _sample(self, unit: _Unit, logits: Logits) -> None:
        """A token for each sequence sampled here, from its last logit row: the greedy ones
        in one batch."""
        picks: list[tuple[int, int, SamplingParams, torch.Generator | None]] = []
        row = 0
        samplers, seqs, want = self.samplers, unit.bound.seqs, unit.msg.want_logits
        for seq, rows in zip(logits.seqs, logits.rows_per_seq):
            if rows:
                sampler = samplers.get(seqs[seq].seq_id)
                if sampler is not None:
                    picks.append((seq, row + rows - 1, *sampler))
                if want:
                    unit.logits[seq] = logits.values[row:row + rows]
            row += rows
        if not picks:
            return
        values = logits.values
        # a decode step samples every row: the logits as they are, no gather
        last = (values if len(picks) == len(values) else
                values[[row for _, row, _, _ in picks]]).cpu()  # [S, V]
        greedy = [i for i, (_, _, params, _) in enumerate(picks) if params.greedy]
        tokens: dict[int, int | None] = {}
        if greedy:
            tokens = dict(zip(greedy, greedy_tokens(
                last if len(greedy) == len(picks) else last[greedy])))
        for i, (seq, _, params, generator) in enumerate(picks):
            try:  # one request's sampling failing fails that request alone
                if i not in tokens and params.seed is not None and generator is not None:
                    chunk = seqs[seq]  # the new token's position: its draw's own seed
                    seed_draw(generator, params.seed, chunk.start + chunk.num_tokens)
                token = tokens[i] if i in tokens else sample(last[i], params, generator)
                if token is None:
                    raise SamplingError("the model produced non-finite logits")
                unit.tokens[seq] = token
            except Exception as exc:
                log.warning("%s: request %d: sampling failed: %r", self.name,
                            unit.bound.seqs[seq].seq_id, exc)
                unit.errors[seq] = f"sampling failed: {type(exc).__name__}: {exc}"
        asks = [(i, seq, params.logprobs) for i, (seq, _, params, _) in enumerate(picks)
                if params.logprobs is not None and seq in unit.tokens]
        if asks:
            rows = last[[i for i, _, _ in asks]]
            for (_, seq, _), lp in zip(asks, token_logprobs(
                    rows, [unit.tokens[seq] for _, seq, _ in asks], [k for _, _, k in asks])):
                unit.logprobs[seq] = lp

    def _maybe_done(self, unit: _Unit) -> list[Outgoing]:
        if not self.execution.plan_done(unit.index):
            return []
        self._drop(unit)
        return [Outgoing(COORDINATOR, UnitPart(unit.unit_id, self.name, unit.tokens,
                                               unit.logits, unit.errors, unit.logprobs,
                                               tuple(unit.spans or ()),
                                               tuple(unit.arrivals or ())))]

    def abort(self, unit_id: int) -> None:
        unit = self.units.get(unit_id)
        self.early.pop(unit_id, None)
        if unit is None:
            return
        self.execution.forget(unit.index)
        if unit.homed:
            self.worker.abort(unit_id)
        self._drop(unit)

    def _drop(self, unit: _Unit) -> None:
        self.units.pop(unit.unit_id, None)
        self.by_index.pop(unit.index, None)
        self.execution.release(unit.index)
        if unit.homed:
            self.worker.end(unit.unit_id)



def _size(msg: Data | Done) -> int:
    """Bytes an early message holds (its tensors, and a little for the rest)."""
    if isinstance(msg, Data):
        return 256 + sum(t.numel() * t.element_size() for t in msg.payload.tensors)
    return 64
