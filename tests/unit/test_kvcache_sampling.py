"""Paged KV cache bookkeeping and sampling."""

from __future__ import annotations

import pytest
import torch

from moeflow.actors.kvcache import KVCacheFull, PagedKVCache
from moeflow.ops.sampling import (
    SamplingError, SamplingParams, greedy_tokens, make_generator, sample,
)


def test_a_large_cpu_pool_sits_on_memory_advised_for_huge_pages(vm_flags, monkeypatch):
    kv = PagedKVCache(num_layers=2, width=512, dtype=torch.bfloat16, max_tokens=8192,
                      block_size=16, initial_tokens=2048)  # 2 MiB a layer
    assert all("hg" in vm_flags(p.data_ptr()) for p in kv.pools)
    slots = kv.reserve(1, 0, 4096)  # grows to 4 MiB a layer, still zeroed past the old
    assert all("hg" in vm_flags(p.data_ptr()) for p in kv.pools)
    assert kv.pools[0].shape[0] == 4096 and not kv.pools[1].any()
    kv.write(0, slots, torch.ones(4096, 512, dtype=torch.bfloat16))
    assert kv.pools[0].sum().item() == 4096 * 512
    monkeypatch.setenv("MOEFLOW_HUGE_PAGES", "off")
    small = PagedKVCache(num_layers=1, width=512, dtype=torch.bfloat16, max_tokens=4096,
                         block_size=16, initial_tokens=2048)
    assert "hg" not in vm_flags(small.pools[0].data_ptr())


def test_cache_grows_reuses_freed_blocks_and_refuses_past_its_budget():
    kv = PagedKVCache(num_layers=2, width=3, dtype=torch.float32, max_tokens=64,
                      block_size=4, initial_tokens=8)
    slots = kv.reserve(7, 0, 10)  # 3 blocks; pool grows from 2
    assert slots.shape == (10,) and len(set(slots.tolist())) == 10
    kv.write(1, slots, torch.arange(30, dtype=torch.float32).view(10, 3))
    blocks, width = kv.block_table([7])
    assert width == 3 and kv.slot_list(7, 0, 10) == slots.tolist()
    whole = kv.read_blocks(1, torch.tensor(blocks), 1)  # [1, 3 blocks of 4, W]
    assert torch.equal(whole[0, :10], torch.arange(30, dtype=torch.float32).view(10, 3))
    kv.reserve(9, 0, 3)
    table, width = kv.block_table([9, 7])  # padded with block 0 to the longest table
    assert width == 3 and table == [kv.seqs[9].blocks[0], 0, 0, *blocks]
    kv.free(9)
    more = kv.reserve(7, 10, 1)
    assert kv.length(7) == 11 and more.shape == (1,)
    with pytest.raises(ValueError, match="holds 11 tokens"):
        kv.reserve(7, 3, 1)
    with pytest.raises(KVCacheFull):
        kv.reserve(8, 0, 64)
    assert kv.length(8) == 0  # a refused reservation changes nothing
    kv.free(7)
    assert kv.num_free_blocks == 16
    kv.reserve(8, 0, 64)


def test_greedy_and_seeded_sampling():
    logits = torch.tensor([0.1, 3.0, 0.2, 2.9])
    assert sample(logits, SamplingParams(), None) == 1
    p = SamplingParams(temperature=1.0, seed=123)
    a = [sample(logits, p, g) for g in [make_generator(p)] for _ in range(20)]
    b = [sample(logits, p, g) for g in [make_generator(p)] for _ in range(20)]
    assert a == b and set(a) <= {0, 1, 2, 3}
    top1 = SamplingParams(temperature=5.0, top_k=1, seed=1)
    assert {sample(logits, top1, make_generator(top1)) for _ in range(10)} == {1}
    nucleus = SamplingParams(temperature=1.0, top_p=0.5, seed=2)
    assert {sample(logits, nucleus, make_generator(nucleus)) for _ in range(30)} <= {1, 3}


def test_greedy_tokens_take_the_first_maximum_and_refuse_what_sample_refuses():
    """A batch's argmax in one op: fp32 on the CPU through numpy, other dtypes through
    torch's max, with the same answers (the first of equal maxima; None for a row with a
    NaN, a +inf, or nothing but -inf)."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 300, generator=gen)
    logits[0, 17] = logits[0, 250] = 40.0  # a tie: the first
    logits[1, 3] = float("nan")
    logits[2, 99] = float("inf")
    logits[3] = float("-inf")
    logits[4, :] = 0.0  # all equal: the first
    want = [17, None, None, None, 0, int(logits[5].argmax())]
    assert greedy_tokens(logits) == want
    assert greedy_tokens(logits.double()) == want  # torch's path
    every_other = logits[:, ::2]  # a strided view
    assert greedy_tokens(every_other) == greedy_tokens(every_other.double())


@pytest.mark.parametrize("kwargs,match", [
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_k": -2}, "top_k"), ({"stop": ("",)}, "stop"),
])
def test_sampling_params_validate(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("temperature", [1e-45, 5e-324, 1e-6, 1e-5, 0.7, 1e30])
@pytest.mark.parametrize("top_p", [1e-300, 0.5, 1.0])
@pytest.mark.parametrize("top_k", [0, 1, 3])
def test_every_accepted_value_samples_a_likely_token(temperature, top_p, top_k):
    logits = torch.tensor([0.5, 9.0, 3.0, -2.0, 8.9, float("-inf")])
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k,
                            seed=(1 << 64) - 1)
    gen = make_generator(params)
    picks = {sample(logits, params, gen) for _ in range(20)}
    assert 5 not in picks  # -inf is never drawn
    if temperature < 1e-5 or top_p == 1e-300 or top_k == 1:
        assert picks == {1}  # greedy in effect: the argmax, whatever fp32 rounds to
    if top_k == 3:
        assert picks <= {1, 4, 2}


@pytest.mark.parametrize("bad", [[1.0, float("nan"), 2.0], [float("nan"), 1.0],
                                 [1.0, float("inf")], [float("-inf")] * 3])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_non_finite_logits_fail_that_request_with_a_clear_error(bad, temperature):
    params = SamplingParams(temperature=temperature, seed=1)
    with pytest.raises(SamplingError, match="non-finite"):
        sample(torch.tensor(bad), params, make_generator(params))


def test_token_logprobs_are_the_models_log_probabilities():
    from moeflow.actors.messages import UnitPart, decode, encode
    from moeflow.ops.sampling import token_logprobs

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 0.0]])
    [first, second] = token_logprobs(logits, [1, 2], [2, 0])
    expected = torch.log_softmax(logits, dim=-1)
    assert first[0] == pytest.approx(float(expected[0, 1]))
    assert [i for i, _ in first[1]] == [0, 1]  # the top two, likeliest first
    assert first[1][0][1] == pytest.approx(float(expected[0, 0]))
    assert second == (pytest.approx(float(expected[1, 2])), ())
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=21)
    # they travel from the actors with the tokens
    part = UnitPart(3, "cpu:1", {0: 1, 1: 2}, logprobs={0: first, 1: second})
    assert decode(encode(part)) == part


def _transformers_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    generation = pytest.importorskip("transformers.generation.logits_process")
    scores = logits[None].float()
    for warper in (generation.TemperatureLogitsWarper(params.temperature),
                   generation.TopKLogitsWarper(params.top_k) if params.top_k else None,
                   generation.TopPLogitsWarper(params.top_p) if params.top_p < 1 else None):
        if warper is not None:
            scores = warper(None, scores)
    return torch.softmax(scores, dim=-1)[0]


def _our_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    from moeflow.ops.sampling import sampling_logprobs

    logprobs, order = sampling_logprobs(logits.float(), params)
    probs = logprobs.exp()
    probs /= probs.sum()  # what top-p drops is not renormalised: Gumbel-max needs no sum
    return probs if order is None else torch.zeros_like(probs).scatter_(0, order, probs)


def test_the_distribution_drawn_from_is_transformers_warpers():
    """Temperature, top-k (ties at the k-th kept), top-p over what top-k left: the
    probabilities sampled from equal transformers' warpers', on random and tied logits."""
    rng = torch.Generator().manual_seed(0)
    cases = [(torch.log(torch.tensor([0.5, 0.3, 0.2])),
              SamplingParams(temperature=1.0, top_k=2, top_p=0.6)),
             (torch.tensor([2.0, 1.0, 1.0, 0.0]), SamplingParams(temperature=1.0, top_k=2)),
             (torch.tensor([1.0, 1.0, 0.0]), SamplingParams(temperature=1.0, top_k=1))]
    for _ in range(300):
        v = int(torch.randint(2, 40, (1,), generator=rng))
        # bf16-like logits: coarse values, so ties are common
        logits = (torch.randn(v, generator=rng) * 4).round() / 4
        params = SamplingParams(
            temperature=float(torch.rand(1, generator=rng)) * 2 + 0.05,
            top_k=int(torch.randint(0, v + 2, (1,), generator=rng)),
            top_p=float(torch.rand(1, generator=rng)) if torch.rand(1, generator=rng) < 0.7
            else 1.0)
        cases.append((logits, params))
    for logits, params in cases:
        ours, theirs = _our_probs(logits, params), _transformers_probs(logits, params)
        # which of several tied tokens top-p cuts is either's own choice: compare the mass
        # of each logit value
        for value in logits.unique():
            tied = logits == value
            assert abs(float(ours[tied].sum() - theirs[tied].sum())) < 1e-5, (
                logits, params, ours, theirs)
