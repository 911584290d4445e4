"""moeflow's CPU kernels: GEMMs in which a few rows meet each weight (decode), and many.

At decode a CPU's time goes to streaming weights: each token reads every active weight
once, with a few rows (sequences, or tokens routed to one expert) per weight. torch sends
bf16 matmuls to oneDNN, which streams weights at a fraction of the memory bandwidth when
rows are few, and its own bf16 GEMV kernels slow down quickly past one row (the table in
ops/backend.py). These kernels read each weight once from memory whatever the rows: a
tile of 4 weight rows (4 x K x 2 bytes, in L1) meets the input rows 3 at a time in 12 fp32
accumulators, bf16 widened to fp32 by a shift, sums in fp32, the tile's block prefetched
8 KiB ahead. From 16 rows per weight (a prefill, or an expert many tokens chose) the
arithmetic binds instead, and a GEMM takes packed panels: 16 weight rows widened once into
a k-major fp32 buffer, multiplied as outer products 6 input rows at a time (routed experts
choose tile or panel each by its own rows). Results are rounded to the model dtype where
torch's unfused ops would store them, so a kernel and torch agree up to the order of the
sums, whichever path a GEMM takes.

    linear(x, w, bias)                 x [M, K] . w [N, K]^T (+ bias)  -> [M, N]
    rms_norm(x, w, eps)                each row normalised in fp32 and scaled, one pass
    expert_ffn(x, counts, gate_up,     a node's routed experts: rows gathered expert-major
               down, order, scale)     through `order`, SwiGLU per expert (gate/up, SiLU
                                       and mul, down), each row scaled by its
                                       routed weight and stored back at its place: the
                                       gather, the scale and the scatter fused, each
                                       expert's weights streamed once
    dispatch_order(rank, bins,         a stable counting sort of routed rows by expert rank:
                   period, top_k)      the order, each row's token, the counts and the
                                       running ends per item, for argsort, bincount, cumsum
                                       and a division
    route_dispatch(logits, ...)        a gate's top-k (its own softmax and top-k: no torch
                                       op, each 10-30 us with its code cold at decode)
                                       and dispatch_order, in one call; and the routed
                                       rows gathered in dispatch order, if given them
    combine(resid, rows, token,        the routed rows summed at their tokens, the shared
            extras)                    experts' outputs and the residual, rounded where
                                       torch's zeros/index_add_/+=/+ store (bit-exact)
    attention_decode(hidden, ...)      a GQA layer's attention for one new token per
                                       sequence, in one call: input norm, QKV, q/k norms,
                                       rotation, the cache write, paged attention, output
                                       projection, residual and post-norm (bit-exact with
                                       those ops one by one; ~40 torch ops at decode)
    paged_decode_attention(q, pool,    one new token per sequence against its cached keys,
        blocks, lengths, ...)          read in place from the paged KV cache: per chunk of
                                       32 keys, each key and value widened once for up to 4
                                       query heads whose sums stay in registers, the
                                       exponentials 8 at a time, an online softmax in fp32
                                       (AVX-512 BF16: scores on bf16 pairs, 16 keys' sums
                                       reduced together)
    prefill_attention(q, k, v, start,  causal attention of a prompt's new tokens (AVX-512
                      scale)           BF16 only): blocks of 64 rows of a kv head's query
                                       heads against the keys they see, on pair panels, the
                                       probabilities rounded to bf16 for V as torch's CPU
                                       flash attention rounds them (no `_ref` to 1 ulp:
                                       tests hold it as close to fp32 as torch's SDPA is)

They are C++ (moeflow/ops/cpu/kernels.cpp), built on first use with torch's
`cpp_extension` into a cache directory (`~/.cache/moeflow/kernels`, or
$MOEFLOW_KERNEL_CACHE) as a Python module of their own (pybind11, not torch ops: the
dispatcher's boxing cost 1.5-2.5 us more a call, 6-10 us with its code cold, as at decode);
`make install` builds them once. A build keys its directory by the source, torch and flags;
the cache keeps the newest KEEP_BUILDS of them.
Why C++ and not torch.compile: the work per call is a few microseconds to a few hundred,
so the call itself must cost about a microsecond, and the fused expert op needs a loop
over a variable number of experts with variable rows, which Inductor would recompile for
or pad; and the kernel must not depend on oneDNN, whose small-row path is the problem.
Threads: torch's own intra-op pool (`at::parallel_for`), so one OpenMP team per process
and as many threads as torch has (the actor's cores).

The instruction set is chosen at run time by the CPU's features: AVX-512 BF16 where present
(bf16 GEMMs multiply bf16 pairs as they are, by vdpbf16ps: 32 products an instruction, the
input rows kept in bf16, the panels packed as pairs; the tiles, as dense in vdpbf16ps as the
panels and streaming their weights as they multiply, take GEMMs of 1,024 inputs up to 160
rows per weight, not 16, or up to where `moeflow calibrate --kernels` measured panels to
take over (`panel_rows`), and a GEMM of K inputs up to K/1,024 of that (at least 16): a
tile's 16 sums are reduced together once its products are done, a cost a shorter K spreads
over fewer products; everything else as on AVX2), AVX2 +
FMA, portable C++ otherwise (the compiler's baseline vectorization). Each op takes `isa` so
a test can run every path the machine has; the row-wise pieces that the fused ops share with
the unfused path (the norms, the rotation, residual adds, combine's sums) take 8 lanes
wherever the CPU has AVX2, whatever `isa` says, so that both agree bit for bit. Without a
C++ compiler (or with
MOEFLOW_CPU_KERNELS=off) `available()` is False and the worker keeps torch's path.
Which path a GEMM takes, by rows per weight, is `moeflow.ops.cpu.choice`'s (measured on
this machine by `moeflow calibrate --kernels`).

Every kernel has a `*_ref` in torch that sums in fp32 the same way; tests hold the kernels
to 1 bf16 ulp of it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import platform
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import torch

SOURCE = Path(__file__).with_name("kernels.cpp")
ISA_NAMES = {0: "portable", 1: "avx2", 2: "avx512_bf16"}
AUTO = -1

_lock = threading.Lock()
_state: dict[str, Any] = {}  # "ops" once loaded, "error" if the build failed


def cache_dir() -> Path:
    root = os.environ.get("MOEFLOW_KERNEL_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "moeflow" / "kernels"


def _build_key() -> str:
    """The build directory's name: the source, torch, Python, compiler flags and machine
    architecture, so that a changed source or another torch never loads a stale
    library."""
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(f"{torch.__version__} {sys.version_info[:2]} {_CFLAGS} "
             f"{platform.machine()}".encode())
    return h.hexdigest()[:16]


# -fopenmp: at::parallel_for is OpenMP in the header; the library then binds the libgomp.so.1
# that torch has already loaded, so the process keeps one OpenMP runtime
_CFLAGS = ["-O3", "-std=c++17", "-fno-math-errno", "-fopenmp"]


def load(verbose: bool = False) -> Any:
    """The kernels' module (`moeflow_cpu`), built first if needed; None when they are
    switched off or cannot be built (the reason is in `error()`)."""
    ops = _state.get("ops")  # every op of the CPU worker asks: no lock once loaded
    if ops is not None:
        return ops
    with _lock:
        if "ops" in _state or "error" in _state:
            return _state.get("ops")
        if mode() == "off":
            _state["error"] = "switched off by MOEFLOW_CPU_KERNELS=off"
            return None
        try:
            _state["ops"] = _build_or_load(cache_dir() / _build_key(), verbose)
        except Exception as exc:  # no compiler, no ninja, a read-only cache: torch's path
            lines = str(exc).strip().splitlines() or [""]
            _state["error"] = f"{type(exc).__name__}: {lines[-1]}"
            return None
        return _state["ops"]


STALE_LOCK_S = 600  # a build's lock older than this was left by a process that died


def _build_or_load(build: Path, verbose: bool) -> Any:
    """The build directory is keyed by everything that goes into the library, so a library
    there is loaded as it is; otherwise torch's cpp_extension builds it (under its lock
    file, which a killed build leaves behind: one that old is removed first)."""
    library = build / "moeflow_cpu.so"
    if library.exists():
        spec = importlib.util.spec_from_file_location("moeflow_cpu", library)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {library}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    from torch.utils import cpp_extension

    build.mkdir(parents=True, exist_ok=True)
    lock = build / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
        lock.unlink(missing_ok=True)
    module = cpp_extension.load(name="moeflow_cpu", sources=[str(SOURCE)],
                                build_directory=str(build), extra_cflags=_CFLAGS,
                                extra_ldflags=["-fopenmp"], is_python_module=True,
                                verbose=verbose)
    prune_builds(build)
    return module


KEEP_BUILDS = 4  # build directories kept in the cache, the newest, this one among them


def prune_builds(current: Path, keep: int = KEEP_BUILDS) -> list[Path]:
    """Remove the cache's oldest builds beyond `keep` (each source change or torch upgrade
    makes one, ~1.5 MB), never `current` nor one a build is writing (a fresh lock file).
    Another install that needed a removed build makes it again on first use. Returns what
    was removed."""
    builds = [d for d in current.parent.iterdir()
              if d.is_dir() and d != current and len(d.name) == 16
              and all(c in "0123456789abcdef" for c in d.name)]
    builds.sort(key=lambda d: d.stat().st_mtime, reverse=True)
    removed = []
    for old in builds[max(keep - 1, 0):]:
        lock = old / "lock"
        if lock.exists() and time.time() - lock.stat().st_mtime <= STALE_LOCK_S:
            continue
        shutil.rmtree(old, ignore_errors=True)
        removed.append(old)
    return removed


def mode() -> str:
    """MOEFLOW_CPU_KERNELS: `auto` (the default: measured crossovers), `on` (every GEMM the
    kernels take, for tests) or `off` (torch's path)."""
    value = os.environ.get("MOEFLOW_CPU_KERNELS", "auto").strip().lower() or "auto"
    value = {"1": "on", "true": "on", "yes": "on", "0": "off", "false": "off",
             "no": "off"}.get(value, value)
    if value not in ("auto", "on", "off"):
        raise ValueError(f"MOEFLOW_CPU_KERNELS={os.environ['MOEFLOW_CPU_KERNELS']!r}: use "
                         f"auto, on or off")
    return value


def available() -> bool:
    return load() is not None


def error() -> str | None:
    """Why the kernels are not available, or None."""
    load()
    return _state.get("error")


def best_isa() -> int:
    ops = load()
    return -1 if ops is None else int(ops.best_isa())


def isas() -> list[int]:
    """Every instruction-set path this machine can run, portable first."""
    return list(range(best_isa() + 1))


def panel_rows() -> int:
    """Rows per weight from which bf16 GEMMs of 1,024 inputs on pairs (AVX-512 BF16) take
    packed panels rather than tiles, in this process (a GEMM of K inputs from K/1,024 of
    that, at least 16; the other paths: from 16); 0 without kernels."""
    ops = load()
    return 0 if ops is None else int(ops.panel_rows())


def set_panel_rows(rows: int) -> None:
    """Set `panel_rows` for this process (the CPU worker sets it from its kernel choice,
    `moeflow calibrate --kernels` while it measures); nothing without kernels."""
    ops = load()
    if ops is not None:
        ops.set_panel_rows(rows)


def describe() -> str:
    """The path in use, for stats lines: `avx512_bf16`, `avx2`, `portable`, or why
    torch's."""
    ops = load()
    if ops is None:
        return f"torch (kernels unavailable: {error()})"
    return ISA_NAMES.get(best_isa(), str(best_isa()))


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
           isa: int = AUTO) -> torch.Tensor:
    """x [M, K], w [N, K], bias [N] or None (all bf16 or all fp32, CPU, contiguous)
    -> [M, N]"""
    return load().linear(x, w, bias, isa)


def linear_ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None
               ) -> torch.Tensor:
    y = x.float() @ w.float().T  # [M, N]
    return (y if bias is None else y + bias.float()).to(x.dtype)


def expert_ffn(x: torch.Tensor, counts: list[int], gate_up: torch.Tensor, down: torch.Tensor,
               order: torch.Tensor | None = None, scale: torch.Tensor | None = None,
               isa: int = AUTO) -> torch.Tensor:
    """x [n, D] routed rows; counts [G] rows per expert, in the order `order` [n] (int64,
    expert-major position -> row of x; None: x is sorted by expert); gate_up [G, 2F, D]
    (gate rows first), down [G, D, F]; scale [n] (fp32, per row of x) or None -> [n, D],
    row r of the output for row r of x."""
    return load().expert_ffn(x, order, counts, gate_up, down, scale, isa)


def expert_ffn_ref(x: torch.Tensor, counts: list[int], gate_up: torch.Tensor,
                   down: torch.Tensor, order: torch.Tensor | None = None,
                   scale: torch.Tensor | None = None) -> torch.Tensor:
    """`expert_ffn` in torch: sums in fp32, rounded to x's dtype where torch's unfused ops
    store (gate/up, SiLU, the product, down, the scale and the scaled output)."""
    def rnd(t: torch.Tensor) -> torch.Tensor:
        return t.to(x.dtype).float()

    rows = torch.arange(x.shape[0]) if order is None else order
    y = torch.empty(x.shape, dtype=torch.float32)
    f, start = down.shape[2], 0
    for e, num in enumerate(counts):
        idx = rows[start:start + num]
        h = rnd(x[idx].float() @ gate_up[e].float().T)  # [num, 2F]
        a = rnd(rnd(torch.nn.functional.silu(h[:, :f])) * h[:, f:])  # [num, F]
        y[idx] = rnd(a @ down[e].float().T)
        start += num
    if scale is not None:
        y *= rnd(scale)[:, None]
    return y.to(x.dtype)


def paged_decode_attention(q: torch.Tensor, pool: torch.Tensor, blocks: torch.Tensor,
                           lengths: list[int], block_size: int, kv_heads: int,
                           window: int | None, scale: float, isa: int = AUTO
                           ) -> torch.Tensor:
    """One new token per sequence against its cached keys, read in place from the paged
    cache: q [B, H, d]; pool [S, 2 K d] (a layer's slots, each its K key heads then its K
    value heads); blocks [B * n] (int64, each sequence's block table padded to n);
    lengths [B] keys each sequence sees (its new one included; with `window`, only the
    last `window`) -> [B, H, d]. Each (sequence, kv head) reads its keys and values once
    for its H/K query heads, with an online softmax in fp32."""
    return load().paged_decode_attention(q.contiguous(), pool, blocks, lengths, block_size,
                                         kv_heads, window, scale, isa)


def paged_decode_attention_ref(q: torch.Tensor, pool: torch.Tensor, blocks: torch.Tensor,
                               lengths: list[int], block_size: int, kv_heads: int,
                               window: int | None, scale: float) -> torch.Tensor:
    batch, heads, d = q.shape
    table = blocks.view(batch, -1)
    out = torch.empty(batch, heads, d)
    for b, length in enumerate(lengths):
        pos = torch.arange(max(0, length - window) if window else 0, length)
        slots = table[b][pos // block_size] * block_size + pos % block_size
        kv = pool[slots].float().view(len(pos), 2, kv_heads, d)  # [L, 2, K, d]
        k = kv[:, 0].repeat_interleave(heads // kv_heads, dim=1)  # [L, H, d]
        v = kv[:, 1].repeat_interleave(heads // kv_heads, dim=1)
        probs = torch.softmax(torch.einsum("hd,lhd->hl", q[b].float(), k) * scale, dim=-1)
        out[b] = torch.einsum("hl,lhd->hd", probs, v)
    return out.to(q.dtype)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
                      scale: float, isa: int = AUTO) -> torch.Tensor:
    """Causal attention of n new tokens of one sequence at positions start .. start + n - 1:
    q [n, H, d], k, v [start + n, K, d] (its keys so far, then the new ones), bf16 ->
    [n, H, d]. AVX-512 BF16 only (`best_isa() >= 2`): blocks of 64 rows against the keys
    they see, the probabilities rounded to bf16 for the product with V."""
    return load().prefill_attention(q.contiguous(), k.contiguous(), v.contiguous(), start,
                                    scale, isa)


def prefill_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
                          scale: float) -> torch.Tensor:
    n, heads, _ = q.shape
    group = heads // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)  # [L, H, d]
    vf = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q.float(), kf) * scale
    pos = torch.arange(start, start + n)[:, None]
    scores = scores.masked_fill(torch.arange(k.shape[0])[None, :] > pos, float("-inf"))
    return torch.einsum("hnl,lhd->nhd", torch.softmax(scores, dim=-1), vf).to(q.dtype)


def attention_decode(hidden: torch.Tensor, input_norm: torch.Tensor, qkv_w: torch.Tensor,
                     qkv_b: torch.Tensor | None, q_norm: torch.Tensor | None,
                     k_norm: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                     pool: torch.Tensor, slots: torch.Tensor, blocks: torch.Tensor,
                     lengths: list[int], block_size: int, heads: int, kv_heads: int,
                     window: int | None, scale: float, o_w: torch.Tensor,
                     o_b: torch.Tensor | None, post_norm: torch.Tensor, eps: float,
                     isa: int = AUTO) -> tuple[torch.Tensor, torch.Tensor]:
    """A decode step of a GQA attention layer: hidden [T, D] of T sequences, one new token
    each -> (resid, xn) [T, D], as `attention_decode_ref`'s ops give them. q_norm/k_norm:
    [d] per head, or [H d]/[K d] over the whole width, or both None; cos/sin: the half
    rotation tables of the T positions ([T, d] or [T, 1, d], sin signed); pool: the layer's
    cache (written at slots [T]); blocks, lengths: as `paged_decode_attention`'s."""
    resid, xn = load().attention_decode(
        hidden.contiguous(), input_norm, qkv_w, qkv_b, q_norm, k_norm,
        cos.reshape(cos.shape[0], -1).contiguous(), sin.reshape(sin.shape[0], -1).contiguous(),
        pool, slots.contiguous(), blocks.contiguous(), lengths, block_size, heads, kv_heads,
        window, scale, o_w, o_b, post_norm, eps, isa)
    return resid, xn


def attention_decode_ref(hidden: torch.Tensor, input_norm: torch.Tensor, qkv_w: torch.Tensor,
                         qkv_b: torch.Tensor | None, q_norm: torch.Tensor | None,
                         k_norm: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                         pool: torch.Tensor, slots: torch.Tensor, blocks: torch.Tensor,
                         lengths: list[int], block_size: int, heads: int, kv_heads: int,
                         window: int | None, scale: float, o_w: torch.Tensor,
                         o_b: torch.Tensor | None, post_norm: torch.Tensor, eps: float
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention_decode` in torch ops and the other kernels' refs (writes pool too)."""
    from moeflow.ops.norm import rms_norm_ref
    from moeflow.ops.rope import apply_half_rotation

    num, d = hidden.shape[0], qkv_w.shape[0] // (heads + 2 * kv_heads)
    qkv = linear_ref(rms_norm_ref(hidden, input_norm, eps), qkv_w, qkv_b)
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=1)
    if q_norm is not None:
        q = rms_norm_ref(q.reshape(-1, q_norm.numel()), q_norm, eps).view(num, -1)
        k = rms_norm_ref(k.reshape(-1, k_norm.numel()), k_norm, eps).view(num, -1)
    qk = torch.cat((q, k), dim=1).view(num, heads + kv_heads, d)
    qk = apply_half_rotation(qk, cos.reshape(num, 1, d), sin.reshape(num, 1, d))
    pool.index_copy_(0, slots, torch.cat((qk[:, heads:].flatten(1), v), dim=1))
    attn = paged_decode_attention_ref(qk[:, :heads], pool, blocks, lengths, block_size,
                                      kv_heads, window, scale)
    resid = hidden + linear_ref(attn.flatten(1), o_w, o_b)
    return resid, rms_norm_ref(resid, post_norm, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [R, D], weight [D] or [G, D] (same dtype; row r takes weight row r % G) -> [R, D]:
    moeflow.ops.norm.rms_norm in one pass."""
    return load().rms_norm(x, weight.contiguous(), eps)


def dispatch_order(rank: torch.Tensor, bins: int, period: int, top_k: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """rank [N] (int64, in [0, bins)) -> (order [N] int64: a stable sort of the rows by
    rank; token [N]: order // top_k; counts [bins] int64; ends [bins] int32: the running
    sum of counts, restarting every `period` bins)"""
    order, token, counts, ends = load().dispatch_order(rank.contiguous(), bins, period, top_k)
    return order, token, counts, ends


def dispatch_order_ref(rank: torch.Tensor, bins: int, period: int, top_k: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    order = torch.argsort(rank, stable=True)
    counts = torch.bincount(rank, minlength=bins)
    ends = torch.cumsum(counts.view(-1, period), 1, dtype=torch.int32).view(-1)
    return order, order // top_k, counts, ends


ROUTE_MODES = {"softmax_topk": 0, "topk_softmax": 1}  # the routers route_dispatch runs


def route_dispatch(logits: torch.Tensor, router: str, top_k: int, norm: bool, norm_eps: float,
                   scaling: float, rank: torch.Tensor | None, sizes: list[int],
                   x: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                              torch.Tensor | None]:
    """A gate's routing and dispatch order in one call: logits [T, E] of items of `sizes`
    rows each -> (token [N]: each routed row's token within its item; weight [N] fp32;
    counts [items * E] int64, by item then dispatch rank; ends [items * E] int32, running
    within each item), N = T * top_k, rows stably sorted by (item, rank). `router` is
    softmax_topk (renormalised with `norm`, norm_eps added to the sum unless 0, else scaled
    by `scaling`) or topk_softmax, as moeflow.ops.router's `route` computes them (the
    weights within a few fp32 ulps; among equal scores the lower expert first, where
    torch.topk's order is open); rank [E] int64 each expert's dispatch rank (None: the
    identity). With x [T, D] (the rows the logits are of), also the routed rows [N, D] in
    dispatch order (row n: x's row of token n, item by item), else None: a dispatch is then
    a slice of them, where an index_select each cost a few torch ops."""
    out = load().route_dispatch(logits.contiguous(), ROUTE_MODES[router], top_k, norm,
                                norm_eps, scaling, None if rank is None else rank.contiguous(),
                                sizes, None if x is None else x.contiguous())
    return out[0], out[1], out[2], out[3], out[4] if len(out) > 4 else None


def route_dispatch_ref(logits: torch.Tensor, router: str, top_k: int, norm: bool,
                       norm_eps: float, scaling: float, rank: torch.Tensor | None,
                       sizes: list[int]
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if router == "topk_softmax":
        top, ids = torch.topk(logits.float(), top_k, dim=-1)
        weights = torch.softmax(top, dim=-1)
    else:
        weights, ids = torch.topk(torch.softmax(logits.float(), dim=-1), top_k, dim=-1)
        if norm and top_k > 1:
            total = weights.sum(dim=-1, keepdim=True)
            weights = weights / (total + norm_eps if norm_eps else total)
        elif scaling != 1.0:
            weights = weights * scaling
    experts = logits.shape[1]
    item = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))  # [T]
    first = torch.tensor([0, *sizes]).cumsum(0)[item]  # [T]
    bins = (ids if rank is None else rank[ids]) + item[:, None] * experts  # [T, A]
    order, _, counts, ends = dispatch_order_ref(bins.view(-1), len(sizes) * experts, experts,
                                                top_k)
    token = order // top_k
    return token - first[token], weights.reshape(-1)[order], counts, ends


COMBINE_DTYPES = (torch.bfloat16, torch.float32)


def combine(resid: torch.Tensor, rows: torch.Tensor, token: torch.Tensor,
            extras: list[torch.Tensor]) -> torch.Tensor:
    """resid [T, D] + (rows [N, D] added at token [N] (int64), then each extra [T, D]),
    rounded as `combine_ref`'s torch ops store"""
    return load().combine(resid.contiguous(), rows.contiguous(), token.contiguous(),
                          [e.contiguous() for e in extras])


def combine_ref(resid: torch.Tensor, rows: torch.Tensor, token: torch.Tensor,
                extras: list[torch.Tensor]) -> torch.Tensor:
    """The families' order, in the model dtype: routed rows summed into zeros, then the
    shared experts' outputs, then the residual."""
    out = torch.zeros_like(resid)
    if rows.shape[0]:
        out.index_add_(0, token, rows)
    for e in extras:
        out += e
    return resid + out
