"""Paged KV cache bookkeeping and sampling."""

from __future__ import annotations

import pytest
import torch

from moeflow.actors.kvcache import KVCacheFull, PagedKVCache
from moeflow.serve.sampling import SamplingParams, make_generator, sample


def test_cache_grows_reuses_freed_blocks_and_refuses_past_its_budget():
    kv = PagedKVCache(num_layers=2, width=3, dtype=torch.float32, max_tokens=64,
                      block_size=4, initial_tokens=8)
    slots = kv.reserve(7, 0, 10)  # 3 blocks; pool grows from 2
    assert slots.shape == (10,) and len(set(slots.tolist())) == 10
    kv.write(1, slots, torch.arange(30, dtype=torch.float32).view(10, 3))
    index, lengths = kv.gather_index([7])
    assert lengths.tolist() == [10]
    assert torch.equal(kv.read(1, index.flatten()), torch.arange(30, dtype=torch.float32).view(10, 3))
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


@pytest.mark.parametrize("kwargs,match", [
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_k": -2}, "top_k"), ({"stop": ("",)}, "stop"),
])
def test_sampling_params_validate(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)
