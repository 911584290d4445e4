"""moeflow's CPU kernels (moeflow/ops/cpu) against their torch references, on every
instruction-set path this machine has, and the worker's choice between them and torch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from moeflow.ops import cpu as kernels
from moeflow.ops.cpu.choice import KernelChoice, kernel_choice, linear as cpu_linear, use_choice
from moeflow.ops.experts import ExpertGroup, swiglu_batches_cpu

if os.environ.get("MOEFLOW_CPU_KERNELS") == "off" or shutil.which("c++") is None:
    pytest.skip("CPU kernels switched off, or no C++ compiler to build them",
                allow_module_level=True)

DTYPES = [torch.bfloat16, torch.float32]
ROWS = [1, 2, 3, 4, 5, 7, 16, 33, 64, 70]


def test_kernels_are_built():
    """A fresh install builds them (make install); a broken build fails here, not later."""
    assert kernels.available(), kernels.error()
    assert kernels.isas()[0] == 0 and kernels.describe() in kernels.ISA_NAMES.values()


def test_the_stats_line_names_the_path_of_the_runs_dtype():
    from moeflow.ops.cpu.choice import describe

    assert "bf16 GEMMs" in describe(torch.bfloat16) and "fp32" not in describe(torch.bfloat16)
    assert "fp32 GEMMs" in describe(torch.float32) and "bf16 GEMMs" not in describe(
        torch.float32)
    assert describe(torch.float16).startswith("torch's")


def test_a_kernel_call_releases_the_gil():
    """Another Python thread runs while a kernel runs (the engine's thread must not stall
    the server's): the main thread watches a worker thread through one long call, and runs
    through most of it. Holding the GIL, the call would let it run at most a switch
    interval (5 ms) of a call at least 10 times as long."""
    import threading
    import time

    w = torch.randn(4096, 4096)
    kernels.linear(w[:1], w)  # loaded, and warm

    def watch(rows: int) -> tuple[float, float]:
        """(how long the main thread saw the call running, how long the call took)"""
        x = torch.randn(rows, 4096)
        state = {"inside": False, "took": 0.0}

        def call() -> None:
            state["inside"] = True
            start = time.perf_counter()
            kernels.linear(x, w)
            state["took"] = time.perf_counter() - start
            state["inside"] = False

        first = last = 0.0
        thread = threading.Thread(target=call)
        thread.start()
        while thread.is_alive():
            if state["inside"]:
                last = time.perf_counter()
                first = first or last
        thread.join()
        return last - first, state["took"]

    for rows in (256, 1024, 4096):  # a call long enough to tell, on any machine
        watched, took = watch(rows)
        if took >= 0.05:
            break
    assert took >= 0.05, f"a {rows}-row call took {took * 1e3:.1f} ms: too short to tell"
    assert watched > took / 2, (watched, took)


def test_old_builds_are_pruned_from_the_cache(tmp_path):
    """Past the newest KEEP_BUILDS, builds go; never the current one, one being written
    (a fresh lock), or anything that is not a build (choice.json)."""
    import time

    now = time.time()
    names = [f"{i:016x}" for i in range(7)]
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "moeflow_cpu.so").write_bytes(b"")
    (tmp_path / names[6] / "lock").write_text("")  # being built
    for age, name in enumerate(names):  # 0000000000000000 the newest
        os.utime(tmp_path / name, (now - 60 * age, now - 60 * age))
    (tmp_path / "choice.json").write_text("{}")
    current = tmp_path / names[5]  # an old one, just loaded
    removed = kernels.prune_builds(current, keep=3)
    assert sorted(p.name for p in removed) == names[2:5]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([*names[:2], names[5], names[6], "choice.json"])


def test_switched_off_the_worker_keeps_torch():
    code = ("from moeflow.ops import cpu; from moeflow.ops.cpu.choice import kernel_choice, "
            "describe; assert not cpu.available(); assert kernel_choice().linear_rows == 0; "
            "print(describe())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "MOEFLOW_CPU_KERNELS": "off"}, check=True)
    assert "torch (kernels unavailable: switched off by MOEFLOW_CPU_KERNELS=off)" in out.stdout


def assert_close(y: torch.Tensor, ref: torch.Tensor, ulp: int = 1) -> None:
    """bf16: within `ulp` ulps of the reference (by bit pattern, same sign); fp32: as close
    as sums of a few hundred terms in another order are."""
    assert y.dtype == ref.dtype and y.shape == ref.shape
    if y.dtype == torch.float32:
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)
        return
    a, b = y.view(torch.int16).int(), ref.view(torch.int16).int()
    same_sign = (a < 0) == (b < 0)
    ulps = torch.where(same_sign, (a - b).abs(), torch.full_like(a, 1 << 16))
    tiny = (y.float() - ref.float()).abs() <= 1e-30  # +0 and -0
    bad = (ulps > ulp) & ~tiny
    assert not bad.any(), (f"{int(bad.sum())} of {y.numel()} outputs beyond {ulp} ulp, worst "
                           f"{int(ulps[bad].max())}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
def test_linear_matches_ref(dtype, rows):
    gen = torch.Generator().manual_seed(rows)
    for k, n in [(67, 13), (1, 5), (16, 4), (259, 33)]:  # odd, under one block, one block
        x = torch.randn(rows, k, generator=gen).to(dtype)
        w = torch.randn(n, k, generator=gen).to(dtype)
        bias = torch.randn(n, generator=gen).to(dtype)
        for isa in kernels.isas():
            assert_close(kernels.linear(x, w, bias, isa), kernels.linear_ref(x, w, bias))
            assert_close(kernels.linear(x, w, None, isa), kernels.linear_ref(x, w))


def routed_problem(dtype, rows_per_expert, d=45, f=37, seed=0):
    gen = torch.Generator().manual_seed(seed)
    counts = list(rows_per_expert)
    n, g = sum(counts), len(counts)
    x = torch.randn(n, d, generator=gen).to(dtype)
    gate_up = (torch.randn(g, 2 * f, d, generator=gen) / d ** 0.5).to(dtype)
    down = (torch.randn(g, d, f, generator=gen) / f ** 0.5).to(dtype)
    order = torch.randperm(n, generator=gen)
    scale = torch.rand(n, generator=gen)
    return x, counts, gate_up, down, order, scale


def assert_expert_ffn_close(x, counts, gate_up, down, order, scale):
    """expert_ffn on every path against its ref, with and without order and scale: within
    2 ulps of the fp32 ref (a 1-ulp difference of a rounded gate/up output moves the output
    by up to one more), and within 1 ulp of the same ops on the gate/up that `linear` gives
    on that path (itself held to 1 ulp of its ref); scaled, within 2 (a down output 1 ulp
    apart is up to 2 ulps apart once scaled into a lower binade, where ulps are half as
    large)."""
    def on_gemm(isa, order, scale):
        rows = torch.arange(x.shape[0]) if order is None else order
        y, f, start = torch.empty(x.shape, dtype=torch.float32), down.shape[2], 0
        for e, num in enumerate(counts):
            idx = rows[start:start + num]
            h = kernels.linear(x[idx].contiguous(), gate_up[e].contiguous(), isa=isa).float()
            a = rnd(rnd(torch.nn.functional.silu(h[:, :f])) * h[:, f:])
            y[idx] = rnd(a @ down[e].float().T)
            start += num
        if scale is not None:
            y *= rnd(scale)[:, None]
        return y.to(x.dtype)

    def rnd(t):
        return t.to(x.dtype).float()

    for isa in kernels.isas():
        for o, s in ((order, scale), (None, None)):
            y = kernels.expert_ffn(x, counts, gate_up, down, o, s, isa)
            assert_close(y, kernels.expert_ffn_ref(x, counts, gate_up, down, o, s), ulp=2)
            assert_close(y, on_gemm(isa, o, s), ulp=1 if s is None else 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
def test_expert_ffn_matches_ref(dtype, rows):
    """Rows per expert from 0 to `rows`, gathered through an order, scaled, scattered."""
    assert_expert_ffn_close(*routed_problem(dtype, [rows, 0, 1, rows // 2, 3]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_expert_ffn_reads_long_runs_split_among_threads(dtype):
    """Tiled experts with many weight tiles each (a run is an expert's tiles in a thread's
    chunk), the chunks of two threads cutting through an expert."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for rows in ([1, 3, 0, 2], [2, 1], [5]):
            assert_expert_ffn_close(*routed_problem(dtype, rows, d=160, f=131, seed=len(rows)))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", DTYPES)
def test_expert_ffn_splits_long_runs_of_wide_tiles(dtype):
    """A run of an expert's tiles keeps its sums in at most 256 KiB: with 63 rows (a tile's
    sums 1 KiB, 260 tiles a run) and 1,100 weight rows a pass (275 tiles), gate/up and down
    split an expert's run in two (and the chunks of two threads cut them too). Every
    value positive: sums of a thousand terms that cancel to near 0 would be many ulps of
    their small result apart on any path (the sums' order differs), split or not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, counts, gate_up, down, order, scale = routed_problem(dtype, [63, 2, 0, 40], d=1100,
                                                               f=1100, seed=3)
        assert_expert_ffn_close(x.abs(), counts, gate_up.abs(), down.abs(), order, scale)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [[20, 0, 17, 33, 1], [40, 2, 3, 16, 15], [16],
                                  [70, 3, 64, 63, 0]])
def test_expert_ffn_with_many_rows_per_expert_matches_ref(dtype, rows):
    """Prefill-sized: an expert with many rows takes packed panels of 16 weight rows (from
    16 rows on AVX2; on the bf16 pairs from a number that scales with the GEMM's inputs,
    here 46 for gate/up (300 inputs) and 16 for down (70): an expert of 20-40 rows takes
    tiles for one and panels for the other), one with fewer the tiles, in the same call
    (widths here not a multiple of 16 or 8, and wider than one 256-column block)."""
    assert_expert_ffn_close(*routed_problem(dtype, rows, d=300, f=70))


@pytest.mark.parametrize("dtype", DTYPES)
# panels on every path, panels on AVX2 and tiles on the pairs, tiles
@pytest.mark.parametrize("rows", [64 + 5, 2 * 16 + 5, 5])
def test_expert_ffn_epilogues_agree_at_extreme_values(dtype, rows):
    """The SiLU-and-mul and the scaled store run 8 lanes at a time on AVX2 and up (a
    partial last 8 too), with a polynomial exp: gate values where exp(-g) nears or passes
    overflow (g below -87), or underflows, and outputs near the largest floats come out as
    the portable path's std::exp gives them. 19 columns: two whole 8-lane steps, then 3."""
    values = torch.tensor([-200.0, -100.0, -89.0, -88.5, -88.0, -87.5, -30.0, -1.0, -1e-3,
                           0.0, -0.0, 1e-3, 1.0, 30.0, 88.5, 1e18, -87.2, 4.0, -50.0])
    f = len(values)  # gate = up = x, down = I: each output is silu(x) * x, scaled
    x = torch.stack([values.roll(r) for r in range(rows)]).to(dtype)
    eye = torch.eye(f)
    gate_up, down = torch.cat((eye, eye))[None].to(dtype), eye[None].to(dtype)
    scale = torch.linspace(0.5, 2.0, rows)
    portable = kernels.expert_ffn(x, [rows], gate_up, down, None, scale, 0)
    xf = x.float()
    expect = xf * torch.sigmoid(xf) * xf * scale[:, None]  # 0 where exp(-g) overflows
    expect[xf < -88.72] = 0.0
    assert torch.isfinite(portable.float()).all()
    torch.testing.assert_close(portable.float(), expect, rtol=2 ** -6, atol=0)
    for isa in kernels.isas()[1:]:
        y = kernels.expert_ffn(x, [rows], gate_up, down, None, scale, isa)
        assert_close(y, portable)
        # relative, down to the smallest outputs (assert_close lets |y| < 1e-30 pass)
        torch.testing.assert_close(y.float(), portable.float(), atol=0,
                                   rtol=2 ** -7 if dtype == torch.bfloat16 else 1e-5)


def test_expert_ffn_rounds_where_torch_stores():
    """In bf16 the fused op agrees with torch's unfused ops (F.linear, SiLU, mul, scale):
    what a GEMM gives does not depend on the path it took."""
    x, counts, gate_up, down, _, scale = routed_problem(torch.bfloat16, [3, 2], d=64, f=48)
    group = ExpertGroup.of(gate_up, down)
    use_choice(KernelChoice(0, 0, "test"))
    try:
        torch_path = swiglu_batches_cpu([x], [counts], group, scale)
    finally:
        use_choice(None)
    assert_close(kernels.expert_ffn(x, counts, gate_up, down, scale=scale), torch_path)


def test_expert_ffn_empty_and_errors():
    x, counts, gate_up, down, order, scale = routed_problem(torch.float32, [2, 1])
    empty = kernels.expert_ffn(x[:0], [0, 0], gate_up, down)
    assert empty.shape == (0, x.shape[1])
    with pytest.raises(RuntimeError, match="counts sum to 2, x has 3 rows"):
        kernels.expert_ffn(x, [1, 1], gate_up, down)
    with pytest.raises(RuntimeError, match="do not agree"):
        kernels.expert_ffn(x, [2, 1, 0], torch.cat([gate_up, gate_up[:1]]), down)
    with pytest.raises(RuntimeError, match="3 counts for 2 experts"):
        kernels.expert_ffn(x, [2, 1, 0], gate_up, down)
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.expert_ffn(x, counts, gate_up, down, torch.tensor([0, 1, 7]))
    with pytest.raises(RuntimeError, match="is BFloat16, the input Float"):
        kernels.expert_ffn(x, counts, gate_up.bfloat16(), down)
    with pytest.raises(RuntimeError, match="do not agree"):
        kernels.expert_ffn(x[:, :-1].contiguous(), counts, gate_up, down)


def test_linear_errors():
    x, w = torch.randn(2, 8), torch.randn(3, 8)
    with pytest.raises(RuntimeError, match=r"x is \[2, 7\], w \[3, 8\]"):
        kernels.linear(x[:, :7].contiguous(), w)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        kernels.linear(x, torch.randn(8, 3).T)
    with pytest.raises(RuntimeError, match="bfloat16 or float32"):
        kernels.linear(x.double(), w.double())
    with pytest.raises(RuntimeError, match="not available"):
        kernels.linear(x, w, isa=kernels.best_isa() + 1)


def test_worker_linear_takes_the_kernel_up_to_the_crossover(monkeypatch):
    """The CPU worker's linear goes to the kernel at rows <= the crossover and to torch
    beyond it (or for what the kernel does not take), with the same result."""
    calls = []
    real = kernels.linear
    monkeypatch.setattr(kernels, "linear", lambda *a, **k: calls.append(a[0].shape[0])
                        or real(*a, **k))
    w = torch.randn(24, 40).bfloat16()
    use_choice(KernelChoice(4, 4, "test"))
    try:
        for rows in (1, 4, 5, 9):
            x = torch.randn(rows, 40).bfloat16()
            assert_close(cpu_linear(x, w), kernels.linear_ref(x, w))
        cpu_linear(torch.randn(2, 40).double(), w.double())  # not a kernel dtype
    finally:
        use_choice(None)
    assert calls == [1, 4]
    assert kernel_choice().source != "test"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 37, 128])
@pytest.mark.parametrize("heads", [8, 2, 6, 10, 16])  # 4, 1, 3, 5 and 8 per kv head
def test_paged_decode_attention_matches_ref(dtype, head_dim, heads):
    """Block tables in any order, lengths from 1 to several blocks (chunks of keys whole
    and cut), a sliding window; query heads per kv head in one pass and in several; head
    widths in whole 32-column steps and with a masked tail (the pairs path's scores take
    32 columns a step, its values 32 lanes a pass)."""
    gen = torch.Generator().manual_seed(head_dim)
    batch, kv_heads, block = 4, 2, 16
    pool = torch.randn(40 * block, 2 * kv_heads * head_dim, generator=gen).to(dtype)
    blocks = torch.randperm(40, generator=gen)[:batch * 5]
    q = torch.randn(batch, heads, head_dim, generator=gen).to(dtype)
    lengths = [1, 16, 17, 75]  # 75: two chunks of 32 keys and a cut one of 11
    for window in (None, 20):
        ref = kernels.paged_decode_attention_ref(q, pool, blocks, lengths, block, kv_heads,
                                                 window, head_dim ** -0.5)
        for isa in kernels.isas():
            out = kernels.paged_decode_attention(q, pool, blocks, lengths, block, kv_heads,
                                                 window, head_dim ** -0.5, isa)
            assert_close(out, ref)


@pytest.mark.parametrize("n,start,heads,kv_heads,d", [
    (200, 0, 16, 4, 64),  # blocks of 64 rows and a cut one; 4 query heads per kv head
    (37, 0, 6, 2, 37),  # an odd head width (a pair completed by 0), 3 per kv head
    (20, 50, 8, 8, 128),  # after 50 cached keys (a later chunk of a prompt), 1 per kv head
    (1, 0, 4, 4, 16),
])
def test_prefill_attention_matches_ref(n, start, heads, kv_heads, d):
    """Causal prefill attention on bf16 pairs: as close to the fp32 reference as torch's
    SDPA is (both round the probabilities to bf16 for the product with V)."""
    from moeflow.ops.attention import prefill_attention

    if kernels.best_isa() < 2:
        pytest.skip("the prefill attention kernel needs AVX-512 BF16")
    gen = torch.Generator().manual_seed(n)
    q = torch.randn(n, heads, d, generator=gen).bfloat16()
    k, v = (torch.randn(start + n, kv_heads, d, generator=gen).bfloat16() for _ in range(2))
    scale = d ** -0.5
    ref = kernels.prefill_attention_ref(q, k, v, start, scale).float()
    out = kernels.prefill_attention(q, k, v, start, scale).float()
    sdpa = prefill_attention(q, k, v, start, scale).float()
    err, sdpa_err = (out - ref).abs(), (sdpa - ref).abs()
    assert err.max() <= max(2 * sdpa_err.max(), 2 ** -6)
    assert err.mean() <= 2 * sdpa_err.mean() + 1e-6
    # a row sees only the keys up to its position: later keys change nothing before them
    k2, v2 = k.clone(), v.clone()
    k2[start + n - 1], v2[start + n - 1] = 100.0, -100.0
    again = kernels.prefill_attention(q, k2, v2, start, scale)
    assert torch.equal(again[:-1], kernels.prefill_attention(q, k, v, start, scale)[:-1])


def test_prefill_attention_errors():
    if kernels.best_isa() < 2:
        pytest.skip("the prefill attention kernel needs AVX-512 BF16")
    q, k = torch.randn(4, 8, 16).bfloat16(), torch.randn(4, 2, 16).bfloat16()
    with pytest.raises(RuntimeError, match="takes bfloat16"):
        kernels.prefill_attention(q.float(), k.float(), k.float(), 0, 0.25)
    with pytest.raises(RuntimeError, match="do not agree"):
        kernels.prefill_attention(q, k, k, 1, 0.25)  # 4 keys for 4 tokens after 1 cached
    with pytest.raises(RuntimeError, match="needs AVX-512 BF16"):
        kernels.prefill_attention(q, k, k, 0, 0.25, isa=1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_decode_attention_one_sequence_split_over_threads(dtype):
    """One sequence: its kv heads are shared among the threads; and a NaN stays a NaN."""
    gen = torch.Generator().manual_seed(3)
    heads, kv_heads, d, block = 16, 4, 32, 16
    pool = torch.randn(8 * block, 2 * kv_heads * d, generator=gen).to(dtype)
    blocks = torch.tensor([5, 2, 7, 0])
    q = torch.randn(1, heads, d, generator=gen).to(dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        ref = kernels.paged_decode_attention_ref(q, pool, blocks, [50], block, kv_heads, None,
                                                 d ** -0.5)
        for isa in kernels.isas():
            assert_close(kernels.paged_decode_attention(q, pool, blocks, [50], block, kv_heads,
                                                        None, d ** -0.5, isa), ref)
        q[0, 5, 3] = float("nan")  # a query head of kv head 1
        for isa in kernels.isas():
            out = kernels.paged_decode_attention(q, pool, blocks, [50], block, kv_heads, None,
                                                 d ** -0.5, isa)
            assert out[0, 5].isnan().all() and not out[0, :4].isnan().any()
    finally:
        torch.set_num_threads(threads)


def test_paged_decode_attention_errors():
    q, pool = torch.randn(2, 4, 8), torch.zeros(64, 32)
    blocks = torch.tensor([0, 1, 2, 3])
    with pytest.raises(RuntimeError, match="sees 40 keys in 2 blocks of 16"):
        kernels.paged_decode_attention(q, pool, blocks, [3, 40], 16, 2, None, 1.0)
    with pytest.raises(RuntimeError, match="block 9 is outside the pool"):
        kernels.paged_decode_attention(q, pool, torch.tensor([0, 1, 9, 3]), [3, 20], 16, 2,
                                       None, 1.0)
    with pytest.raises(RuntimeError, match="do not agree"):
        kernels.paged_decode_attention(q, pool, blocks, [3, 4], 16, 3, None, 1.0)


def test_calibration_is_saved_and_taken_on_this_cpu_only(tmp_path, monkeypatch):
    """`moeflow calibrate --kernels` (small shapes here): its crossovers are what the
    worker then takes, unless the file was written on another CPU."""
    import json

    from moeflow.ops.cpu import calibrate, choice

    monkeypatch.setenv("MOEFLOW_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(calibrate, "D", 64)
    monkeypatch.setattr(calibrate, "F", 32)
    monkeypatch.setattr(calibrate, "POOL_BYTES", 1 << 20)
    monkeypatch.setattr(calibrate, "LINEAR_ROWS", (1, 4))
    monkeypatch.setattr(calibrate, "EXPERT_ROWS", (1, 2))
    monkeypatch.setattr(calibrate, "PANEL_ROWS", (2, 4))
    pairs = kernels.best_isa() >= 2  # only the bf16 pairs choose between tiles and panels
    before = kernels.panel_rows()
    lines: list[str] = []
    measured, table = calibrate.calibrate_kernels(quick=True, log=lines.append)
    assert len(lines) == (6 if pairs else 4) and len(table["linear"]["kernel_s"]) == 2
    assert measured.linear_rows in (0, 1, 4, choice.ALL_ROWS)
    assert measured.expert_rows in (0, 1, 2, choice.ALL_ROWS)
    assert measured.panel_rows in ((2, 4, 8) if pairs else (0,))
    assert kernels.panel_rows() == before  # measuring leaves the process's setting be
    path = choice.save_choice(choice.KernelChoice(3, 5, "calibrated", panel_rows=40), table)
    try:
        assert path == tmp_path / "choice.json"
        taken = choice.kernel_choice()
        assert (taken.linear_rows, taken.expert_rows, taken.source) == (3, 5, str(path))
        assert taken.panel_rows == 40 and kernels.panel_rows() == 40  # the kernels take it
        body = json.loads(path.read_text())
        path.write_text(json.dumps({**body, "cpu": "another CPU"}))
        choice._measured_choice.cache_clear()
        assert choice.kernel_choice() == choice.default_choice()
        # measured on this CPU by a build whose kernels took another path: measured again
        path.write_text(json.dumps({**body, "table": {**body["table"], "isa": "older"}}))
        choice._measured_choice.cache_clear()
        assert choice.kernel_choice() == choice.default_choice()
    finally:
        choice._measured_choice.cache_clear()
        kernels.set_panel_rows(before)


def test_panel_rows_choose_the_path_not_the_result():
    """The bf16 pairs take tiles below `panel_rows` rows per weight (scaled by K/1024, at
    least 16) and packed panels from there: either way within 1 ulp of the reference, and
    a bad setting is refused."""
    before = kernels.panel_rows()
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(20, 259, generator=gen).bfloat16()
    w = torch.randn(37, 259, generator=gen).bfloat16()
    gate_up = (torch.randn(2, 2 * 37, 259, generator=gen) / 16).bfloat16()
    down = (torch.randn(2, 259, 37, generator=gen) / 6).bfloat16()
    try:
        # K 259: panels from 16, 20 (83 * 259 // 1024), 21 (84 ...) rows: the 20 rows of x
        # take panels, panels, tiles, tiles; an expert of 17 rows, panels for gate/up (K
        # 259) then tiles, and for down (K 37: from 16 whatever the setting) until panels
        # start past 17 rows at every K (1 << 40); one of 3 rows, tiles throughout
        for rows in (1, 83, 84, 1 << 40):
            kernels.set_panel_rows(rows)
            assert kernels.panel_rows() == rows
            assert_close(kernels.linear(x, w), kernels.linear_ref(x, w))
            for counts in ([12, 8], [17, 3]):
                assert_close(kernels.expert_ffn(x, counts, gate_up, down),
                             kernels.expert_ffn_ref(x, counts, gate_up, down), ulp=2)
        with pytest.raises(RuntimeError, match="at least 1"):
            kernels.set_panel_rows(0)
    finally:
        kernels.set_panel_rows(before)


@pytest.mark.parametrize("flags,isa,widen,expect", [
    ({"avx2", "avx512_bf16", "amx_bf16"}, 2, False, (16, 16)),  # AMX: oneDNN's tiles
    ({"avx2", "avx512_bf16"}, 2, False, (256, 128)),  # the kernels' pairs
    ({"avx2"}, 1, True, (1 << 30, 1 << 30)),  # no bf16 arithmetic: every size
    ({"sse4_2"}, 0, True, (0, 0)),  # the portable path alone: torch's
])
def test_default_choice_by_the_cpus_features(monkeypatch, flags, isa, widen, expect):
    from moeflow.ops.cpu import choice

    monkeypatch.setattr(choice, "_cpu_info", lambda: ("a CPU", frozenset(flags)))
    monkeypatch.setattr(choice, "widen_on_this_cpu", lambda: widen)
    monkeypatch.setattr(kernels, "best_isa", lambda: isa)
    taken = choice.default_choice()
    assert (taken.linear_rows, taken.expert_rows) == expect and "default" in taken.source


def test_routed_experts_take_the_kernel_by_their_mean_rows(monkeypatch):
    """The crossover is compared with the experts' mean rows, not their busiest's: one
    expert of 40 rows and three of 2 (mean 11.5) take the kernel at a crossover of 16."""
    x, counts, gate_up, down, _, scale = routed_problem(torch.bfloat16, [40, 2, 2, 2], d=64,
                                                        f=48)
    calls: list[list[int]] = []
    fused = kernels.expert_ffn

    def counted(x, counts, *args, **kwargs):
        calls.append(list(counts))
        return fused(x, counts, *args, **kwargs)

    monkeypatch.setattr(kernels, "expert_ffn", counted)
    group = ExpertGroup.of(gate_up, down)
    for limit, taken in ((16, True), (11, False)):
        use_choice(KernelChoice(16, limit, "test"))
        try:
            calls.clear()
            swiglu_batches_cpu([x], [counts], group, scale)
            assert calls == ([counts] if taken else [])
        finally:
            use_choice(None)


def test_crossover_tolerates_noise_but_not_a_loss():
    from moeflow.ops.cpu.calibrate import _crossover
    from moeflow.ops.cpu.choice import ALL_ROWS

    assert _crossover((1, 2, 4, 8), [1.0, 1.05, 2.0, 1.0], [1.0, 1.0, 1.0, 5.0]) == 2
    assert _crossover((1, 2), [3.0, 1.0], [1.0, 1.0]) == 0
    assert _crossover((1, 2), [0.5, 0.5], [1.0, 1.0]) == 2  # with bf16 arithmetic
    # without: won throughout, so every size; a tie at the end, no further than measured
    assert _crossover((1, 2), [0.5, 0.5], [1.0, 1.0], extrapolate=True) == ALL_ROWS
    assert _crossover((1, 2), [0.5, 1.05], [1.0, 1.0], extrapolate=True) == 2


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_kernel_matches_ref(dtype):
    from moeflow.ops.norm import rms_norm, rms_norm_ref

    gen = torch.Generator().manual_seed(1)
    for shape in [(1, 1024), (5, 3, 37), (0, 16)]:
        x = torch.randn(*shape, generator=gen).to(dtype)
        w = torch.randn(shape[-1], generator=gen).to(dtype)
        assert_close(kernels.rms_norm(x.reshape(-1, shape[-1]), w, 1e-6).view(shape),
                     rms_norm_ref(x, w, 1e-6))
        assert_close(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_kernel_takes_a_weight_per_head(dtype):
    """Qwen3's q/k norms, one weight row per head: x [T, G, D], w [G, D], as one kernel call
    on a strided view (the q and k heads of a fused projection)."""
    from moeflow.ops.norm import rms_norm, rms_norm_ref

    gen = torch.Generator().manual_seed(2)
    qkv = torch.randn(3, 7, 37, generator=gen).to(dtype)
    x = qkv[:, :5]  # not contiguous
    w = torch.randn(5, 37, generator=gen).to(dtype)
    assert_close(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6))
    assert_close(kernels.rms_norm(x.reshape(-1, 37), w, 1e-6).view(x.shape),
                 rms_norm_ref(x, w, 1e-6))
    with pytest.raises(RuntimeError, match="w"):
        kernels.rms_norm(x.reshape(-1, 37), w[:, :36].contiguous(), 1e-6)


def test_expert_ffn_order_must_be_a_permutation():
    x, counts, gate_up, down, _, _ = routed_problem(torch.float32, [2, 1])
    with pytest.raises(RuntimeError, match=r"not a permutation \(1 twice\)"):
        kernels.expert_ffn(x, counts, gate_up, down, torch.tensor([0, 1, 1]))


@pytest.mark.parametrize("value,mode", [("OFF", "off"), ("0", "off"), ("on", "on"),
                                        ("", "auto"), ("Auto", "auto")])
def test_the_switch_reads_common_spellings(monkeypatch, value, mode):
    monkeypatch.setenv("MOEFLOW_CPU_KERNELS", value)
    assert kernels.mode() == mode


def test_an_unknown_switch_is_refused(monkeypatch):
    monkeypatch.setenv("MOEFLOW_CPU_KERNELS", "maybe")
    with pytest.raises(ValueError, match="MOEFLOW_CPU_KERNELS='maybe': use auto, on or off"):
        kernels.mode()


@pytest.mark.parametrize("dtype", DTYPES)
def test_combine_is_bit_exact_with_torchs_ops(dtype):
    """zeros, index_add_ (fp32 sums, stored once), += per shared expert, + the residual:
    the same bits, whatever the rows, tokens and extras."""
    gen = torch.Generator().manual_seed(3)
    for trial in range(60):
        t, n, d = (int(torch.randint(lo, hi, (1,), generator=gen))
                   for lo, hi in ((1, 17), (0, 130), (1, 300)))
        resid = torch.randn(t, d, generator=gen).to(dtype)
        rows = (torch.randn(n, d, generator=gen) * 3).to(dtype)
        token = torch.randint(0, t, (n,), generator=gen)
        extras = [torch.randn(t, d, generator=gen).to(dtype) for _ in range(trial % 3)]
        assert torch.equal(kernels.combine(resid, rows, token, extras),
                           kernels.combine_ref(resid, rows, token, extras))


def test_combine_errors():
    resid, rows = torch.zeros(2, 4), torch.zeros(3, 4)
    with pytest.raises(RuntimeError, match="token 2 is out of"):
        kernels.combine(resid, rows, torch.tensor([0, 1, 2]), [])
    with pytest.raises(RuntimeError, match="an extra is"):
        kernels.combine(resid, rows, torch.tensor([0, 1, 1]), [torch.zeros(3, 4)])
    with pytest.raises(RuntimeError, match="rows must be"):
        kernels.combine(resid, rows.bfloat16(), torch.tensor([0, 1, 1]), [])


def test_dispatch_order_matches_torchs_sort():
    gen = torch.Generator().manual_seed(4)
    for n, bins, period, top_k in [(8, 64, 64, 8), (128, 128, 64, 8), (0, 16, 16, 2),
                                   (37, 30, 10, 1), (6, 4, 2, 3)]:
        rank = torch.randint(0, bins, (n,), generator=gen)
        got = kernels.dispatch_order(rank, bins, period, top_k)
        want = kernels.dispatch_order_ref(rank, bins, period, top_k)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and torch.equal(a, b)
    with pytest.raises(RuntimeError, match="rank 5 is out of"):
        kernels.dispatch_order(torch.tensor([0, 5]), 4, 2, 1)
    with pytest.raises(RuntimeError, match="period"):
        kernels.dispatch_order(torch.tensor([0, 1]), 4, 3, 1)


def attention_problem(dtype, qk_norm, seed=0, heads=6, kv_heads=2, d=16, dim=40, bias=False,
                      window=None):
    """A decode step of 3 sequences (lengths 1, 17 and 40 with the new token) over a
    shuffled paged cache: every input of `attention_decode` but the cache, and the cache."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen) * s).to(dtype)

    block, lengths = 8, [1, 17, 40]
    blocks = torch.randperm(20, generator=gen)[:3 * 5]
    pool = rand(20 * block, 2 * kv_heads * d)
    table = blocks.view(3, 5)
    slots = torch.tensor([int(table[b][(n - 1) // block]) * block + (n - 1) % block
                          for b, n in enumerate(lengths)])
    norms = {"none": (None, None), "head": (rand(d) + 1, rand(d) + 1),
             "full": (rand(heads * d) + 1, rand(kv_heads * d) + 1)}[qk_norm]
    angles = torch.rand(3, d // 2, generator=gen) * 6
    cos, sin = torch.cat((angles.cos(),) * 2, 1), torch.cat((-angles.sin(), angles.sin()), 1)
    width = (heads + 2 * kv_heads) * d
    args = dict(hidden=rand(3, dim), input_norm=rand(dim) + 1, qkv_w=rand(width, dim, s=0.3),
                qkv_b=rand(width) if bias else None, q_norm=norms[0], k_norm=norms[1],
                cos=cos.to(dtype), sin=sin.to(dtype), slots=slots, blocks=blocks,
                lengths=lengths, block_size=block, heads=heads, kv_heads=kv_heads,
                window=window, scale=d ** -0.5, o_w=rand(dim, heads * d, s=0.3),
                o_b=rand(dim) if bias else None, post_norm=rand(dim) + 1, eps=1e-6)
    return args, pool


def unfused_attention(a, pool, isa):
    """The worker's unfused decode path: the kernels one by one, torch's ops between."""
    from moeflow.ops.rope import apply_half_rotation

    num, heads, kv_heads = a["hidden"].shape[0], a["heads"], a["kv_heads"]
    d = a["qkv_w"].shape[0] // (heads + 2 * kv_heads)
    x = kernels.rms_norm(a["hidden"], a["input_norm"], a["eps"])
    qkv = kernels.linear(x, a["qkv_w"], a["qkv_b"], isa)
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=1)
    if a["q_norm"] is not None:
        q = kernels.rms_norm(q.reshape(-1, a["q_norm"].numel()).contiguous(), a["q_norm"],
                             a["eps"]).view(num, -1)
        k = kernels.rms_norm(k.reshape(-1, a["k_norm"].numel()).contiguous(), a["k_norm"],
                             a["eps"]).view(num, -1)
    qk = apply_half_rotation(torch.cat((q, k), 1).view(num, -1, d), a["cos"][:, None],
                             a["sin"][:, None])
    pool.index_copy_(0, a["slots"], torch.cat((qk[:, heads:].flatten(1), v), dim=1))
    attn = kernels.paged_decode_attention(qk[:, :heads], pool, a["blocks"], a["lengths"],
                                          a["block_size"], kv_heads, a["window"], a["scale"],
                                          isa)
    resid = a["hidden"] + kernels.linear(attn.flatten(1), a["o_w"], a["o_b"], isa)
    return resid, kernels.rms_norm(resid, a["post_norm"], a["eps"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", ["none", "head", "full"])
@pytest.mark.parametrize("bias,window", [(False, None), (True, None), (False, 20)])
def test_attention_decode_is_bit_exact_with_the_unfused_ops(dtype, qk_norm, bias, window):
    """One call gives what the kernels and torch's ops give one by one (the worker's path
    without it), cache writes included; and it stays close to the torch reference. With
    biases, and with a sliding window shorter than the longest sequence."""
    args, pool = attention_problem(dtype, qk_norm, seed=len(qk_norm) + bias, bias=bias,
                                   window=window)
    ref_pool = pool.clone()
    ref = kernels.attention_decode_ref(pool=ref_pool, **args)
    for isa in kernels.isas():
        fused_pool, unfused_pool = pool.clone(), pool.clone()
        fused = kernels.attention_decode(pool=fused_pool, isa=isa, **args)
        unfused = unfused_attention(args, unfused_pool, isa)
        for got, want in zip(fused, unfused):
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
        assert torch.equal(fused_pool.view(torch.uint8), unfused_pool.view(torch.uint8))
        written = args["slots"]
        assert not torch.equal(fused_pool[written], pool[written])  # the new keys landed
        rows = torch.ones(pool.shape[0], dtype=torch.bool)
        rows[written] = False
        assert torch.equal(fused_pool[rows], pool[rows])  # and nothing else moved
        for got, want in zip(fused, ref):  # sums in another order, through three roundings
            torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.05)


def test_attention_decode_errors():
    args, pool = attention_problem(torch.float32, "head")
    with pytest.raises(RuntimeError, match="slot 999 is outside the cache"):
        kernels.attention_decode(pool=pool, **{**args, "slots": torch.tensor([0, 1, 999])})
    with pytest.raises(RuntimeError, match="q_norm and k_norm come together"):
        kernels.attention_decode(pool=pool, **{**args, "k_norm": None})
    with pytest.raises(RuntimeError, match="5 query heads and 2 kv heads"):
        kernels.attention_decode(pool=pool, **{**args, "heads": 5})
    with pytest.raises(RuntimeError, match="rotation tables"):
        kernels.attention_decode(pool=pool, **{**args, "cos": args["cos"][:2],
                                               "sin": args["sin"][:2]})
    with pytest.raises(RuntimeError, match="is BFloat16, the input Float"):
        kernels.attention_decode(pool=pool.bfloat16(), **args)
    before = pool.clone()  # a bad block table is refused before the cache is written
    with pytest.raises(RuntimeError, match="sequence 1 sees 17 keys in 1 blocks of 8"):
        kernels.attention_decode(pool=pool, **{**args, "blocks": args["blocks"][:3]})
    with pytest.raises(RuntimeError, match="o_b must be a CPU \\[40\\]"):
        kernels.attention_decode(pool=pool, **{**args, "o_b": torch.zeros(39)})
    assert torch.equal(pool, before)


@pytest.mark.parametrize("router", ["softmax_topk", "topk_softmax"])
def test_route_dispatch_agrees_with_torchs_routing_and_sort(router):
    """Routing and dispatch order in one call give torch's ops and a stable sort: the same
    experts, tokens, counts and ends, and weights within a few fp32 ulps, for one item and
    several (one of them empty), any dispatch rank, and each renormalisation."""
    gen = torch.Generator().manual_seed(len(router))
    experts, top_k = 12, 3
    for norm, eps, scaling in ((True, 0.0, 1.0), (True, 1e-20, 1.0), (False, 0.0, 2.5),
                               (False, 0.0, 1.0)):
        for sizes in ([1], [3, 0, 2], [5, 4]):
            for dtype in (torch.bfloat16, torch.float32):
                # no two scores of a row equal: torch.topk leaves their order open
                logits = torch.stack([(torch.randperm(experts, generator=gen) - 6) / 4
                                      for _ in range(sum(sizes))]).to(dtype)
                if dtype == torch.float32:
                    logits += torch.rand(logits.shape, generator=gen) / 8
                for rank in (None, torch.randperm(experts, generator=gen)):
                    x = torch.randn(sum(sizes), 7, generator=gen).to(dtype)
                    *got, rows = kernels.route_dispatch(logits, router, top_k, norm, eps,
                                                        scaling, rank, sizes, x)
                    want = kernels.route_dispatch_ref(logits, router, top_k, norm, eps,
                                                      scaling, rank, sizes)
                    # the routed rows in dispatch order: row n is its token's, item by item
                    first = torch.tensor([0, *sizes[:-1]]).cumsum(0)
                    item = torch.repeat_interleave(torch.arange(len(sizes)),
                                                   torch.tensor(sizes) * top_k)
                    assert torch.equal(rows, x[want[0] + first[item]])
                    assert kernels.route_dispatch(logits, router, top_k, norm, eps, scaling,
                                                  rank, sizes)[4] is None
                    assert [g.dtype for g in got] == [torch.int64, torch.float32,
                                                      torch.int64, torch.int32]
                    for name, g, w in zip(("token", "weight", "counts", "ends"), got, want):
                        if name == "weight":
                            torch.testing.assert_close(g, w, rtol=8 * 2.0**-24, atol=0)
                        else:
                            assert torch.equal(g, w.to(g.dtype)), name


@pytest.mark.parametrize("router", ["softmax_topk", "topk_softmax"])
def test_route_dispatch_ranks_the_lower_expert_first_among_equals(router):
    """Equal scores: the lower expert is chosen, and ranks first (torch.topk's order among
    them is open); a NaN logit ranks above any number, as torch.topk ranks it (after a
    softmax over every expert, a NaN makes the whole row NaN)."""
    logits = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.5, 1.0]])
    token, weight, counts, _, _ = kernels.route_dispatch(logits, router, 3, True, 0.0, 1.0,
                                                         None, [1])
    assert counts.tolist() == [0, 1, 1, 1, 0, 0]
    assert token.tolist() == [0, 0, 0]
    torch.testing.assert_close(weight, torch.full((3,), 1 / 3))
    nan = torch.tensor([[0.0, float("nan"), 2.0, 1.0]])
    _, _, counts, _, _ = kernels.route_dispatch(nan, router, 2, True, 0.0, 1.0, None, [1])
    assert counts.tolist() == ([0, 1, 1, 0] if router == "topk_softmax" else [1, 1, 0, 0])


def test_route_dispatch_agrees_with_the_router():
    """Its weights are moeflow.ops.router.route's (within a few ulps), in the order of its
    rows' experts."""
    from moeflow.models.spec import MoESpec
    from moeflow.ops.router import norm_eps, route

    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(4, 16, generator=gen)
    for moe in (MoESpec(16, 4, 32, router="softmax_topk", norm_topk_prob=True),
                MoESpec(16, 2, 32, router="topk_softmax")):
        ids, weights = route(logits, moe)
        token, weight, counts, _, _ = kernels.route_dispatch(
            logits, moe.router, moe.top_k, moe.norm_topk_prob, norm_eps(moe),
            moe.routed_scaling_factor, None, [4])
        assert counts.tolist() == torch.bincount(ids.view(-1), minlength=16).tolist()
        expert = torch.repeat_interleave(torch.arange(16), counts)
        for t, w, e in zip(token.tolist(), weight.tolist(), expert.tolist()):
            assert w == pytest.approx(float(weights[t][ids[t] == e][0]), rel=8 * 2.0**-24)


def test_route_dispatch_errors():
    logits = torch.randn(3, 8)
    with pytest.raises(RuntimeError, match="items of \\[2\\] rows for 3 rows"):
        kernels.route_dispatch(logits, "softmax_topk", 2, True, 0.0, 1.0, None, [2])
    with pytest.raises(RuntimeError, match="top 9 of 8 experts"):
        kernels.route_dispatch(logits, "softmax_topk", 9, True, 0.0, 1.0, None, [3])
    with pytest.raises(RuntimeError, match="not a permutation"):
        kernels.route_dispatch(logits, "softmax_topk", 2, True, 0.0, 1.0,
                               torch.tensor([0, 1, 2, 3, 4, 5, 6, 6]), [3])
    with pytest.raises(RuntimeError, match="x has 2 rows for 3 rows of logits"):
        kernels.route_dispatch(logits, "softmax_topk", 2, True, 0.0, 1.0, None, [3],
                               torch.zeros(2, 4))
