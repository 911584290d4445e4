"""moeflow.LLM: the synchronous Python API.

    llm = moeflow.LLM("path/to/checkpoint", devices="cpu:0,cpu:1", dtype="auto")
    [out] = llm.generate("Once upon a time", max_new_tokens=32)
    out.text, out.token_ids

A text prompt is tokenized with the checkpoint's tokenizer; a list of ints is used exactly
as given, with nothing prepended.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

import torch

from moeflow.actors.inproc import InProcessExecutor, load_workers, parse_devices
from moeflow.models.families import load_spec
from moeflow.models.spec import ModelSpec
from moeflow.models.tokenizer import Tokenizer
from moeflow.models.weights import torch_dtype
from moeflow.scheduler.base import Cluster, Scheduler
from moeflow.scheduler.registry import make_scheduler
from moeflow.serve.engine import EngineCore, Request
from moeflow.serve.sampling import SamplingParams

if TYPE_CHECKING:
    from moeflow.actors.coordinator import ZmqExecutor

Prompt = Union[str, Sequence[int]]


class NoTokenizerError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Completion:
    request_id: int
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None
    ttft_s: float
    e2e_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        decode = self.e2e_s - self.ttft_s
        return (len(self.token_ids) - 1) / decode if decode > 0 and len(self.token_ids) > 1 \
            else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return len(self.prompt_token_ids) / self.ttft_s if self.ttft_s > 0 else 0.0


def resolve_dtype(dtype: str, checkpoint_dtype: str) -> torch.dtype:
    return torch_dtype(checkpoint_dtype if dtype == "auto" else dtype)


class LLM:
    def __init__(self, model: str | Path, devices: str | Sequence[str] = "cpu:0",
                 dtype: str = "auto", scheduler: str | Scheduler = "batch-ep", *,
                 transport: str = "inproc", kv_cache_tokens: int = 65536,
                 max_batch_tokens: int = 2048, max_seqs: int = 64,
                 record_routing: bool = False) -> None:
        self.model_dir = Path(model)
        self.spec = load_spec(self.model_dir)
        self.tokenizer = Tokenizer.load(self.model_dir)
        self.dtype = resolve_dtype(dtype, self.spec.dtype)
        self.devices = parse_devices(devices)
        cluster = Cluster.sharded(self.devices, self.spec.moe.num_experts)
        self.executor = make_executor(transport, self.model_dir, self.spec, cluster,
                                      self.dtype, kv_cache_tokens, record_routing)
        self.engine = EngineCore(self.spec, self.executor,
                                 make_scheduler(scheduler), cluster, self.tokenizer,
                                 max_batch_tokens=max_batch_tokens, max_seqs=max_seqs)

    def close(self) -> None:
        """Stop the actor processes, if any (also on `with LLM(...) as llm:` exit)."""
        self.executor.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise NoTokenizerError(
                    f"{self.model_dir} has no tokenizer.json, so text prompts cannot be "
                    f"encoded; pass token ids instead")
            return self.tokenizer.encode(prompt)
        ids = list(prompt)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise TypeError(f"a token-id prompt must be a sequence of ints, got {ids[:8]!r}")
        return ids

    def generate(self, prompts: Prompt | Sequence[Prompt], max_new_tokens: int = 16,
                 temperature: float = 0.0, *, sampling: SamplingParams | None = None
                 ) -> list[Completion]:
        """Generate for one prompt or a list of them; returns one Completion per prompt."""
        params = sampling or SamplingParams(max_new_tokens=max_new_tokens,
                                            temperature=temperature)
        batch = _as_batch(prompts)
        requests = [self.engine.add_request(self.encode(p), params) for p in batch]
        while self.engine.has_unfinished():
            self.engine.step()
        return [self._completion(self.engine.pop_finished(r.request_id)) for r in requests]

    def routing_recording(self) -> dict[str, object]:
        """Rows routed to each expert per layer so far (with `record_routing=True`), in the
        form `moeflow simulate --routing recorded:FILE` reads."""
        if self.executor.routing is None:
            raise ValueError("routing is recorded only with LLM(..., record_routing=True)")
        return {"model": self.spec.name, "family": self.spec.family,
                "layers": {str(k): v for k, v in sorted(self.executor.routing.items())}}

    def _completion(self, req: Request) -> Completion:
        first = req.first_token_time if req.first_token_time is not None else req.finish_time
        return Completion(req.request_id, tuple(req.prompt_ids), tuple(req.output_ids),
                          self.engine.text_of(req), req.finish_reason,
                          (first or req.arrival) - req.arrival,
                          (req.finish_time or req.arrival) - req.arrival)


TRANSPORTS = ("inproc", "zmq")


def make_executor(transport: str, model_dir: Path, spec: ModelSpec, cluster: Cluster,
                  dtype: torch.dtype, kv_tokens: int, record_routing: bool = False,
                  want_logits: bool = False) -> InProcessExecutor | ZmqExecutor:
    """Actors in this process ("inproc", the default) or one process each ("zmq")."""
    if transport == "inproc":
        workers = load_workers(model_dir, spec, cluster.placement, dtype, kv_tokens)
        return InProcessExecutor(workers, record_routing=record_routing,
                                 want_logits=want_logits)
    if transport == "zmq":
        from moeflow.actors.coordinator import ZmqExecutor

        return ZmqExecutor(str(model_dir), cluster.placement,
                           str(dtype).removeprefix("torch."), kv_tokens,
                           record_routing=record_routing, want_logits=want_logits)
    raise ValueError(f"unknown transport {transport!r}; expected one of {', '.join(TRANSPORTS)}")


def _as_batch(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    items = list(prompts)
    if not items:
        raise ValueError("no prompts given")
    if any(isinstance(t, int) for t in items):
        return [items]  # one token-id prompt (checked when encoded)
    return items
