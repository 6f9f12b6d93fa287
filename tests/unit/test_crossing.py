"""The message-type patterns of inner.accept_types / inner.his.send_types."""

from gateway.domain.routes import type_allowed


def test_patterns():
    assert type_allowed("SIU^S12", ["SIU^*"])
    assert type_allowed("SIU^S12", ["SIU"])
    assert type_allowed("SIU^S12", ["ADT^*", "SIU^S12"])
    assert not type_allowed("SIU^S26", ["SIU^S12", "SIU^S15"])
    assert not type_allowed("ADT^A01", ["SIU^*"])
    assert not type_allowed("SIUX^S12", ["SIU^*"])
    assert not type_allowed("SIU^S12", [])
