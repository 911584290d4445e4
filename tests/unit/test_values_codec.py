"""Each value a Transfer carries declares its own codec (values.TRAVELS): every kind goes
through the wire form and back unchanged, and a payload of an unknown or malformed kind is
refused with its reason."""

from __future__ import annotations

import pytest
import torch

from moeflow.actors.messages import MessageError, Payload
from moeflow.actors.values import TRAVELS, Page, Partial, Rows, from_payload, to_payload

SAMPLES = {
    "rows": Rows("cpu:1", 3, torch.randn(5, 4), torch.tensor([2, 5], dtype=torch.int32),
                 torch.rand(5)),
    "partial": Partial(7, torch.randn(3, 4)),
    "page": Page((2, 3), torch.randn(2, 6, 4), torch.randn(2, 4, 3), columns=(3, 6)),
}


def _over_the_wire(value):
    sent = to_payload(value)
    return from_payload(Payload(sent.kind, sent.meta, sent.tensors))  # rebuilt and checked


def test_every_kind_that_travels_comes_back_as_it_left():
    assert set(TRAVELS) == set(SAMPLES)
    for kind, value in SAMPLES.items():
        assert to_payload(value).kind == kind
        back = _over_the_wire(value)
        assert type(back) is type(value)
        for name, field in vars(value).items():
            got = getattr(back, name)
            assert torch.equal(got, field) if isinstance(field, torch.Tensor) else got == field
    tensor = torch.randn(2, 3)
    assert torch.equal(_over_the_wire(tensor), tensor)


def test_unknown_and_malformed_payloads_are_refused_with_their_reason():
    with pytest.raises(MessageError, match="unknown payload kind 'nope'"):
        from_payload(Payload("nope", {}, ()))
    with pytest.raises(MessageError, match="bad rows payload with 1 tensors"):
        from_payload(Payload("rows", {"home": "cpu:0", "start": 0}, (torch.zeros(1, 2),)))
    with pytest.raises(MessageError, match="bad partial payload: 'start'"):
        from_payload(Payload("partial", {}, (torch.zeros(1, 2),)))
    with pytest.raises(MessageError, match="^inconsistent page"):
        from_payload(Payload("page", {"experts": [1]}, (torch.zeros(1, 6, 4),
                                                        torch.zeros(1, 4, 2))))
    with pytest.raises(TypeError, match="cannot send a dict"):
        to_payload({})


def test_rows_made_from_counts_travel_with_their_ends():
    """A CPU worker's Rows hold rows per expert as counts (no tensor op); what travels is
    the cumulative ends, and the receiver reads the same counts back."""
    rows = Rows("cpu:0", 4, torch.randn(6, 4), None, torch.rand(6), [2, 0, 3, 1])
    assert torch.equal(to_payload(rows).tensors[1], torch.tensor([2, 2, 5, 6],
                                                                  dtype=torch.int32))
    back = _over_the_wire(rows)
    assert back.counts is None and back.row_counts() == [2, 0, 3, 1]
    assert torch.equal(back.x, rows.x) and back.start == 4


def test_a_payload_made_from_a_value_encodes_it_only_when_its_parts_are_read():
    """Within a process the receiver takes the value itself: sending builds nothing (a
    dispatch's Rows held as counts makes no ends tensor); over the wire, the parts are the
    value's encoding, made once."""
    rows = Rows("cpu:0", 2, torch.randn(3, 4), None, torch.rand(3), counts=[1, 2])
    sent = to_payload(rows)
    assert from_payload(sent) is rows and rows.ends is None
    meta, tensors = sent.meta, sent.tensors
    assert meta == {"home": "cpu:0", "start": 2} and sent.tensors is tensors
    assert torch.equal(tensors[1], torch.tensor([1, 3], dtype=torch.int32))
    assert "rows" in repr(sent) and "3 tensors" in repr(sent)
    with pytest.raises(ValueError, match="needs its meta and tensors"):
        Payload("rows", None, None)
