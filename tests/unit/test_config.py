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
])
def test_bad_values_fail_with_the_field_named(fields, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig("/some/checkpoint", **fields)
