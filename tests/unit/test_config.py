"""EngineConfig checks every field on construction, naming it."""

from __future__ import annotations

import pytest

from moeflow.serve.config import EngineConfig


def test_defaults_and_normalised_devices():
    config = EngineConfig("/some/checkpoint", devices="cpu:0, cpu:1")
    assert config.devices == ("cpu:0", "cpu:1")
    assert (config.scheduler, config.transport, config.dtype) == ("batch-ep", "inproc", "auto")


@pytest.mark.parametrize("fields, match", [
    ({"dtype": "int8"}, "dtype"),
    ({"transport": "tcp"}, "transport"),
    ({"devices": "gpu0"}, "bad device"),
    ({"devices": "cpu:0,cpu:0"}, "twice"),
    ({"kv_cache_tokens": 0}, "kv_cache_tokens"),
    ({"max_batch_tokens": -1}, "max_batch_tokens"),
    ({"max_seqs": 0}, "max_seqs"),
    ({"max_waiting": 0}, "max_waiting"),
    ({"faults": "drop=2"}, "drop"),
    ({"faults": "drop=0.1"}, "transport='zmq'"),
    ({"hardware": "t4", "lengths": "77"}, "lengths must be PROMPT:GEN"),
    ({"hardware": "t4", "lengths": "0:128"}, "lengths must be PROMPT:GEN"),
    ({"hardware": "t4", "lengths": "77:1"}, "lengths must be PROMPT:GEN"),
    ({"hardware": "t4", "lengths": "a:b"}, "lengths must be PROMPT:GEN"),
    ({"lengths": "77:128"}, "give the hardware"),
])
def test_bad_values_fail_with_the_field_named(fields, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig("/some/checkpoint", **fields)


def test_lengths_for_hrm():
    assert EngineConfig("/c", "cgopipe", hardware="t4", lengths="300:32").lengths == (300, 32)
    assert EngineConfig("/c", "cgopipe", hardware="t4", lengths=(5, 2)).lengths == (5, 2)
    assert EngineConfig("/c", "cgopipe", hardware="t4").lengths is None  # 77:128 at build
