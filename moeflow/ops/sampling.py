"""SamplingParams and token sampling.

Greedy when the temperature is below TEMPERATURE_FLOOR (0 included); otherwise temperature,
then top-k, then top-p (nucleus), drawn from a per-request generator; a seeded request's
generator is set for each token from the seed and the token's position (`seed_draw`), so it
is reproducible whatever it is batched with, and when it is preempted and recomputed.

Every value the protocol accepts is safe: the arithmetic is fp32 over log-probabilities
(never `exp` of a scaled logit), the most likely token always survives top-k and top-p, and
non-finite logits (a model that overflowed) are refused with SamplingError, which fails that
request alone.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy
import torch

MAX_NEW_TOKENS_LIMIT = 1 << 20
MAX_SEED = (1 << 64) - 1  # a torch.Generator's seed is 64 bits
MAX_LOGPROBS = 20  # the most likely tokens a request may ask to see per position
# a sampled token's log-probability, and the top-k tokens' (id, log-probability)
Logprobs = tuple[float, tuple[tuple[int, float], ...]]
# below this temperature the distribution is one-hot to fp32 precision for any logit gap
# that matters (a gap of 1e-3 becomes 100 nats): sample greedily instead of dividing by it
TEMPERATURE_FLOOR = 1e-5


def _integer(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")


def _real(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")


class SamplingError(ValueError):
    """A request's logits cannot be sampled (they hold NaN or +inf)."""


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k: the sampled token's and the top k

    def __post_init__(self) -> None:
        # types first: a bool is not a count, a str not a list of stops; a bad value here
        # is the caller's error, found before any request state exists
        _integer("max_new_tokens", self.max_new_tokens)
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise ValueError(f"max_new_tokens must be in [1, {MAX_NEW_TOKENS_LIMIT}], "
                             f"got {self.max_new_tokens}")
        _real("temperature", self.temperature)
        if not 0.0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        _real("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _integer("top_k", self.top_k)
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.seed is not None:
            _integer("seed", self.seed)
            if not 0 <= self.seed <= MAX_SEED:
                raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")
        if self.logprobs is not None:
            _integer("logprobs", self.logprobs)
            if not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if not isinstance(self.ignore_eos, bool):
            raise TypeError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        # one stop string alone is a stop string, not its characters
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if any(not isinstance(s, str) for s in stop):
            raise TypeError(f"stop must be a string or strings, got {self.stop!r}")
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        object.__setattr__(self, "stop", stop)
        stop_ids = tuple(self.stop_token_ids)
        for token in stop_ids:
            _integer("stop_token_ids", token)
            if token < 0:
                raise ValueError(f"stop_token_ids must be >= 0, got {token}")
        object.__setattr__(self, "stop_token_ids", stop_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature < TEMPERATURE_FLOOR


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.greedy:
        return None
    gen = torch.Generator()
    if params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    return gen


def seed_draw(generator: torch.Generator, seed: int, position: int) -> None:
    """Set a seeded request's generator for the token at `position` (its index in the
    sequence): each token's draw depends on the seed and where it falls alone, so a
    request preempted and recomputed on a fresh generator, or batched with others, draws
    what it would have (splitmix64 of the two, as the seed)."""
    z = (seed + (position + 1) * 0x9E3779B97F4A7C15) & MAX_SEED
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MAX_SEED
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MAX_SEED
    generator.manual_seed(z ^ (z >> 31))


def greedy_tokens(logits: torch.Tensor) -> list[int | None]:
    """logits [R, V] -> each row's argmax (the first of equal maxima), in one op for the
    whole batch (in the logits' own dtype: widening them first would copy them all); None
    for a row that `sample` would refuse (NaN, +inf, or every logit -inf). CPU fp32 logits
    go through numpy's argmax, which is vectorized where torch's max with indices is not
    (a row of 32,000: 4 against 31 us; 16 rows: 38 against 225 us), to the same answer."""
    if logits.is_cpu and logits.dtype == torch.float32 and logits.dim() == 2:
        a = logits.detach().numpy()
        ids = a.argmax(axis=-1)  # [R]; the first NaN of a row, as torch's max gives it
        best = a[numpy.arange(a.shape[0]), ids]
    else:
        best, ids = logits.max(dim=-1)  # [R]; a NaN is the max of its row
    isfinite = math.isfinite
    return [i if isfinite(b) else None for i, b in zip(ids.tolist(), best.tolist())]


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: list[int]
                   ) -> list[Logprobs]:
    """logits [R, V], each row's sampled token and how many top tokens it wants -> per row
    the token's log-probability under the model (the raw logits, before temperature, top-k
    or top-p) and the top tokens', most likely first."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [R, V]
    chosen = logprobs.gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist()  # [R]
    most = max(top)
    best = logprobs.topk(most, dim=-1) if most else None  # [R, most]
    out: list[Logprobs] = []
    for r, (lp, k) in enumerate(zip(chosen, top)):
        pairs = () if best is None or not k else tuple(zip(
            best.indices[r, :k].tolist(), best.values[r, :k].tolist()))
        out.append((lp, pairs))
    return out


def sample(logits: torch.Tensor, params: SamplingParams,
           generator: torch.Generator | None) -> int:
    """logits [V] -> one token id. Raises SamplingError for logits holding NaN or +inf."""
    scores = logits.float()
    best = int(torch.argmax(scores))  # NaN counts as the largest value here
    if not math.isfinite(float(scores[best])):  # NaN, +inf, or every logit -inf
        raise SamplingError("the model produced non-finite logits")
    if params.greedy:
        return best
    logprobs, order = sampling_logprobs(scores, params)
    # Gumbel-max over log-probabilities: exact sampling with no normalisation to overflow
    uniform = torch.rand(logprobs.shape, generator=generator, dtype=torch.float32)
    gumbel = -torch.log(-torch.log(uniform.clamp_(min=1e-20, max=1.0 - 1e-7)))
    pick = torch.argmax(logprobs + gumbel)
    return int(pick if order is None else order[pick])


def sampling_logprobs(scores: torch.Tensor, params: SamplingParams
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """scores [V] (fp32, finite max) -> the log-probabilities `sample` draws from (not
    renormalised after top-p: Gumbel-max needs no sum), and the token id of each position
    (None: positions are token ids). Temperature, then top-k,
    then top-p over what top-k left, renormalised: transformers' and vLLM's order. Top-k
    keeps every token that scores as high as the k-th (ties too, as both do)."""
    truncated = 0 < params.top_k < scores.shape[-1] or params.top_p < 1.0
    # ranked by the raw scores, so top-k and top-p keep the likeliest tokens even when the
    # temperature flattens them to equal fp32 values
    ranked, order = (torch.sort(scores, descending=True, stable=True) if truncated
                     else (scores, None))  # [V]
    # shifted so the largest score is 0: dividing by a small temperature gives -inf, never NaN
    logprobs = torch.log_softmax((ranked - ranked.max()) / params.temperature, dim=-1)  # [V]
    if params.top_k and params.top_k < logprobs.shape[-1]:
        logprobs = logprobs.masked_fill(ranked < ranked[params.top_k - 1], float("-inf"))
        logprobs = logprobs - torch.logsumexp(logprobs, dim=-1)  # top-p reads these
    if params.top_p < 1.0:
        probs = logprobs.exp()
        # the smallest prefix whose mass reaches top_p; the first token stays whatever top_p
        # rounds to in fp32
        drop = torch.cumsum(probs, dim=-1) - probs >= params.top_p
        drop[0] = False
        logprobs = logprobs.masked_fill(drop, float("-inf"))
    return logprobs, order
