"""Workloads for the simulator: when requests arrive, how long they are, and where their
tokens route.

Arrivals       poisson:rate=R       exponential gaps, R requests/s
               burst                everyone at time 0
               trace:PATH           one JSON object per line: {"arrival": s, "prompt": n,
                                    "output": n} (lengths optional: then drawn)
Lengths        fixed:N | uniform:A-B | lognormal:MEAN,SIGMA (draws clipped to >= 1)
Routing        uniform              each token picks top-k distinct experts uniformly
               zipf:s=S             expert popularity ~ 1/rank^S (a fresh ranking per layer)
               recorded:PATH        per-layer expert frequencies recorded from a real run
                                    of the model simulated (every layer that routes)
               remote               adversarial: tokens only pick experts their home lacks

Everything draws from one seeded random.Random, so a workload replays exactly.
"""

from __future__ import annotations

import json
import math
import random
from itertools import combinations, compress, repeat, starmap
from operator import lt
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from moeflow.dataflow.graph import Placement

# a token of equal weights picks one of the subsets of k experts where there are at most
# this many (Mixtral's 28 of 8 choose 2), else draws a sample of k
SUBSETS = 4096
MAX_MEAN_LENGTH = 1e7  # tokens
MAX_SIGMA = 4.0  # a lognormal length's: e^(4 * 6) times the median six sigmas out
MAX_ZIPF_S = 50.0  # past it, popularity underflows: 256 ** -50 ~ 1e-120 still counts
# the latest arrival, in seconds from the first (about 3 years): the simulator's times are
# float seconds, which past it keep less than 0.1 us (a rate of 1e-300 once gave a makespan
# of 300 digits, and every latency 0.00 ms, its steps lost in the rounding)
MAX_SPAN_S = 1e8

class WorkloadError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class SimRequest:
    arrival: float
    prompt: int
    output: int


@dataclass(frozen=True, slots=True)
class Lengths:
    kind: str
    a: float
    b: float = 0.0

    @staticmethod
    def parse(text: str) -> Lengths:
        kind, _, arg = text.partition(":")
        try:
            if kind == "fixed" and int(arg) >= 1:
                return Lengths("fixed", int(arg))
            if kind == "uniform":
                lo, hi = arg.split("-")
                if 1 <= int(lo) <= int(hi):
                    return Lengths("uniform", int(lo), int(hi))
            if kind == "lognormal":
                mean, sigma = (float(x) for x in arg.split(","))
                # finite, so that no draw is infinite: lengths of a token or more
                if 1 <= mean <= MAX_MEAN_LENGTH and 0 <= sigma <= MAX_SIGMA:
                    return Lengths("lognormal", mean, sigma)
        except ValueError:
            pass
        raise WorkloadError(f"bad length distribution {text!r}: expected fixed:N (N >= 1), "
                            f"uniform:A-B (1 <= A <= B) or lognormal:MEAN,SIGMA (1 <= MEAN "
                            f"<= {MAX_MEAN_LENGTH:,.0f}, 0 <= SIGMA <= {MAX_SIGMA})")

    def draw(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            value = self.a
        elif self.kind == "uniform":
            value = rng.randint(int(self.a), int(self.b))
        else:  # lognormal with the given mean of the length
            sigma = self.b
            value = rng.lognormvariate(math.log(self.a) - sigma * sigma / 2, sigma)
        return max(1, int(round(value)))


def requests(arrivals: str, num_requests: int, prompt: Lengths, output: Lengths,
             seed: int = 0) -> list[SimRequest]:
    """The requests of a workload, sorted by arrival."""
    kind, _, args = arrivals.partition(":")
    out = _requests(kind, args, arrivals, num_requests, prompt, output, random.Random(seed))
    span = out[-1].arrival - out[0].arrival
    if span > MAX_SPAN_S:
        raise WorkloadError(f"the arrivals of {arrivals!r} span {span:.3g} s, more than the "
                            f"{MAX_SPAN_S:.0e} s over which simulated times stay exact to "
                            f"0.1 us: " + ("a higher rate" if kind == "poisson"
                                           else "a shorter trace") + ", or fewer requests")
    return out


def _requests(kind: str, args: str, arrivals: str, num_requests: int, prompt: Lengths,
              output: Lengths, rng: random.Random) -> list[SimRequest]:
    if kind == "trace":
        return _trace(Path(args), prompt, output, rng, num_requests)
    if num_requests < 1:
        raise WorkloadError("the workload needs at least one request")
    if kind == "burst":
        if args:
            raise WorkloadError(f"burst arrivals take no parameters, got {arrivals!r}")
        times = [0.0] * num_requests
    elif kind == "poisson":
        params = _params(args, ("rate",), arrivals)
        try:
            rate = float(params["rate"])
        except (KeyError, ValueError):
            raise WorkloadError(f"poisson arrivals need rate=R, got {arrivals!r}") from None
        if not 0 < rate < math.inf:
            raise WorkloadError(f"poisson rate must be finite and > 0, got {rate}")
        t, times = 0.0, []
        for _ in range(num_requests):
            t += rng.expovariate(rate)
            times.append(t)
    else:
        raise WorkloadError(f"unknown arrivals {arrivals!r}: expected poisson:rate=R, burst "
                            f"or trace:PATH")
    return [SimRequest(t, prompt.draw(rng), output.draw(rng)) for t in times]


def _params(text: str, known: Sequence[str], whole: str) -> dict[str, str]:
    """`name=value,...` with every name among `known`: a typo (`zipf:1.5`, `rate=4,burst`)
    is an error, not a default taken in silence."""
    params: dict[str, str] = {}
    for part in text.split(",") if text else ():
        name, eq, value = part.partition("=")
        if not eq or name.strip() not in known:
            raise WorkloadError(f"bad parameter {part!r} in {whole!r}: expected "
                                f"{', '.join(f'{k}=VALUE' for k in known)}")
        params[name.strip()] = value
    return params


def _trace(path: Path, prompt: Lengths, output: Lengths, rng: random.Random,
           limit: int) -> list[SimRequest]:
    """One JSON object a line: `arrival` (seconds, >= 0; counted from the first), and
    `prompt` and `output` in tokens (>= 1; drawn from the lengths given where absent)."""
    rows: list[tuple[Decimal, int, int]] = []
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise WorkloadError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:  # a directory, say
        raise WorkloadError(f"{path}: cannot read the trace ({exc})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            # arrivals read exactly, so that time counts from the first without losing
            # what float seconds near a Unix timestamp cannot hold (their 0.24 us steps)
            row = json.loads(line, parse_float=Decimal)
            value = row["arrival"]
            arrival = value if isinstance(value, Decimal) else Decimal(float(value))
            lengths = [row[key] if row.get(key) is not None else dist.draw(rng)
                       for key, dist in (("prompt", prompt), ("output", output))]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise WorkloadError(f"{path}:{n}: bad trace line ({exc})") from None
        if (not arrival.is_finite() or arrival < 0 or any(type(v) is not int for v in lengths)
                or min(lengths) < 1):
            raise WorkloadError(f"{path}:{n}: bad trace line (arrival must be finite and "
                                f">= 0, prompt and output whole tokens, >= 1): "
                                f"{line.strip()[:200]}")
        rows.append((arrival, *lengths))
    if not rows:
        raise WorkloadError(f"{path}: the trace has no requests")
    rows.sort(key=lambda r: r[0])
    rows = rows[:limit] if limit > 0 else rows
    # time counts from the first arrival: a trace of Unix timestamps (1.7e9 s) would leave
    # float seconds too coarse for microsecond steps, and a makespan of 54 years
    first = rows[0][0]
    return [SimRequest(float(arrival - first), prompt_len, output_len)
            for arrival, prompt_len, output_len in rows]


@dataclass(frozen=True, slots=True)
class _Weights:
    weights: list[float]  # per expert
    live: list[int]  # experts of positive weight
    inverse: list[float]  # 1 / weight of each live expert
    ones: bool  # every weight is 1
    cut: float | None  # ones, many live experts: a key the top-k keys almost surely exceed
    # ones, few subsets of k live experts: each of them, for a token to pick one of
    subsets: list[tuple[int, ...]] | None


class Routing:
    """Draws per-expert row counts for a gate over `num_tokens` tokens."""

    def __init__(self, kind: str, num_experts: int, top_k: int, num_layers: int,
                 seed: int = 0, zipf_s: float = 1.0,
                 frequencies: dict[int, list[float]] | None = None) -> None:
        self.kind = kind
        self.num_experts = num_experts
        self.top_k = top_k
        self.rng = random.Random(seed)
        self.weights: dict[int, list[float]] = {}
        self._layer_weights: dict[object, _Weights] = {}  # layer (and home) -> as drawn from
        for layer in range(num_layers):
            if kind == "zipf":
                ranks = list(range(1, num_experts + 1))
                self.rng.shuffle(ranks)
                self.weights[layer] = [r ** -zipf_s for r in ranks]
            elif kind == "recorded":
                assert frequencies is not None
                freq = frequencies.get(layer) or [1.0] * num_experts
                self.weights[layer] = [max(f, 1e-9) for f in freq]
            else:
                self.weights[layer] = [1.0] * num_experts

    @staticmethod
    def parse(text: str, num_experts: int, top_k: int, num_layers: int,
              seed: int = 0, moe_layers: Sequence[int] | None = None) -> Routing:
        """`moe_layers`: the layers that route, which a recording must cover (by default
        every layer)."""
        if moe_layers is None:
            moe_layers = range(num_layers)
        kind, _, arg = text.partition(":")
        if kind in ("uniform", "remote"):
            if arg:
                raise WorkloadError(f"{kind} routing takes no parameters, got {text!r}")
            return Routing(kind, num_experts, top_k, num_layers, seed)
        if kind == "zipf":
            params = _params(arg, ("s",), text)
            try:
                zipf_s = float(params.get("s", 1.0))
            except ValueError:
                zipf_s = math.nan
            if not 0 <= zipf_s <= MAX_ZIPF_S:  # NaN too
                raise WorkloadError(f"bad routing {text!r}: zipf's exponent s must be a "
                                    f"number in [0, {MAX_ZIPF_S}]")
            return Routing("zipf", num_experts, top_k, num_layers, seed, zipf_s=zipf_s)
        if kind == "recorded":
            return Routing("recorded", num_experts, top_k, num_layers, seed,
                           frequencies=load_recording(Path(arg), num_experts, moe_layers))
        raise WorkloadError(f"unknown routing {text!r}: expected uniform, zipf:s=S, "
                            f"recorded:PATH or remote")

    def counts(self, layer: int, num_tokens: int, home: str | None = None,
               placement: Placement | None = None) -> tuple[int, ...]:
        """Rows per expert when `num_tokens` tokens of `home` each pick top-k experts."""
        remote = self.kind == "remote" and home is not None and placement is not None
        key = (layer, home, placement) if remote else layer
        drawn = self._layer_weights.get(key)
        if drawn is None:
            weights = list(self.weights.get(layer, [1.0] * self.num_experts))
            if remote and home is not None and placement is not None:
                local = set(placement.experts_of(home)) if home in placement.devices else set()
                if len(local) <= self.num_experts - self.top_k:
                    weights = [0.0 if e in local else w for e, w in enumerate(weights)]
            live = [e for e, w in enumerate(weights) if w > 0]
            inverse = [1.0 / weights[e] for e in live]
            ones = all(x == 1.0 for x in inverse)
            # m = 3k + 4 of n uniform keys lie above 1 - m/n on average: the top k lie there
            # but about once in 10^5 tokens or less, and then `_winners` sorts every key
            margin = 3 * self.top_k + 4
            cut = 1.0 - margin / len(live) if ones and len(live) >= 4 * margin else None
            subsets = (list(combinations(live, self.top_k))
                       if ones and math.comb(len(live), self.top_k) <= SUBSETS else None)
            drawn = self._layer_weights[key] = _Weights(weights, live, inverse, ones, cut,
                                                        subsets)
        if num_tokens <= 64:
            return self._exact(drawn, num_tokens)
        return self._approximate(drawn.weights, num_tokens)

    def _exact(self, w: _Weights, num_tokens: int) -> tuple[int, ...]:
        """Each token picks top-k distinct experts, weighted without replacement: the k
        largest keys r^(1/w), r uniform, one per expert of positive weight (ties go to the
        larger expert id, as in a reverse sort of (key, expert); -1 for the others). With
        equal weights that is a uniform sample of k, drawn as one: one of the subsets of k
        where they are few (SUBSETS), else `random.sample`."""
        counts = [0] * self.num_experts
        live, inverse, ones = w.live, w.inverse, w.ones  # r ** 1.0 is r
        k, rand = self.top_k, self.rng.random
        if w.subsets is not None:
            for subset in self.rng.choices(w.subsets, k=num_tokens):
                for e in subset:
                    counts[e] += 1
            return tuple(counts)
        if ones and len(live) >= k:  # equal weights: k distinct experts, uniformly
            sample = self.rng.sample
            for _ in range(num_tokens):
                for e in sample(live, k):
                    counts[e] += 1
            return tuple(counts)
        for _ in range(num_tokens):
            draws = starmap(rand, repeat((), len(live)))
            keys = list(draws) if ones else list(map(pow, draws, inverse))
            winners = _winners(keys, live, k, w.cut) if len(live) >= k else []
            if len(winners) != k:  # a tie at the k-th key, or too few experts to pick from
                key = dict(zip(live, keys))
                ranked = sorted(((key.get(e, -1.0), e) for e in range(self.num_experts)),
                                reverse=True)
                winners = [e for _, e in ranked[:k]]
            for e in winners:
                counts[e] += 1
        return tuple(counts)

    def _approximate(self, weights: Sequence[float], num_tokens: int) -> tuple[int, ...]:
        """Many tokens: each expert's count is near T*k*p (capped at T), drawn from a normal
        approximation and rounded so the counts sum to exactly T*k."""
        total = num_tokens * self.top_k
        wsum = sum(weights)
        probs = [min(w / wsum, 1.0 / self.top_k) for w in weights]
        scale = sum(probs)
        probs = [p / scale for p in probs]
        raw = [max(0.0, total * p + math.sqrt(total * p * (1 - p)) * self.rng.gauss(0, 1))
               for p in probs]
        norm = total / (sum(raw) or 1.0)
        counts = [min(num_tokens, int(r * norm)) for r in raw]
        short = total - sum(counts)
        order = sorted(range(len(counts)), key=lambda e: -probs[e])
        i = 0
        while short > 0 and i < 10 * len(order):
            e = order[i % len(order)]
            if counts[e] < num_tokens and probs[e] > 0:
                counts[e] += 1
                short -= 1
            i += 1
        return tuple(counts)


def _winners(keys: list[float], live: list[int], k: int, cut: float | None) -> list[int]:
    """The experts (of `live`, in order) whose key is at least the k-th largest of `keys`:
    k of them, unless keys tie there. With a `cut` that at least k keys exceed, only those
    are sorted (the k-th largest is one of them)."""
    if cut is not None:
        above = list(compress(range(len(keys)), map(lt, repeat(cut), keys)))
        if len(above) >= k:
            kth = sorted([keys[i] for i in above])[-k]
            return [live[i] for i in above if keys[i] >= kth]
    kth = sorted(keys)[-k]
    return list(compress(live, map(kth.__le__, keys)))


def load_recording(path: Path, num_experts: int, moe_layers: Sequence[int]
                   ) -> dict[int, list[float]]:
    """{"layers": {"0": [count per expert], ...}} as `moeflow generate --record-routing`
    writes it, of a model with `num_experts` experts routing in `moe_layers`."""
    try:
        data = json.loads(path.read_text())
        layers = {int(k): [float(x) for x in v] for k, v in data["layers"].items()}
    except FileNotFoundError:
        raise WorkloadError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkloadError(f"{path}: cannot read the recording ({exc})") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise WorkloadError(f"{path}: not a routing recording ({exc})") from None
    for layer, counts in layers.items():
        if len(counts) != num_experts:
            raise WorkloadError(f"{path}: layer {layer} has {len(counts)} experts, the model "
                                f"{num_experts}")
        if any(not 0 <= c < math.inf for c in counts):
            raise WorkloadError(f"{path}: layer {layer}: counts must be finite and >= 0")
    if sorted(layers) != sorted(moe_layers):  # a recording of another model
        raise WorkloadError(f"{path} records layers {_span(sorted(layers))}; the model routes "
                            f"in layers {_span(sorted(moe_layers))}: record the model "
                            f"simulated")
    return layers


def _span(layers: Sequence[int]) -> str:
    if layers and list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
    return ", ".join(map(str, layers)) or "none"
