"""Packet files whose header parses but lies: every lie is a typed, quarantined bad entry."""

from __future__ import annotations

import pytest
import torch

from kvpacket_rag.errors import CorruptPacketError, UntrustedPacketError
from kvpacket_rag.packet import KVPacket
from kvpacket_rag.packet import encode_packet
from kvpacket_rag.store import LocalStore, open_store

from packet_lies import DEEP_JSON, LIES, QUANTIZED_LIES, join, legacy_bytes, rewrite, split

KEY = "k" * 16 + "-a-test-secret-of-32-bytes"


def decode_or_corrupt(data: bytes, verify: bool) -> KVPacket | None:
    """Decode; a CorruptPacketError is fine, any other exception fails the test."""
    try:
        return KVPacket.from_bytes(data, verify=verify)
    except CorruptPacketError:
        return None


@pytest.mark.parametrize("lie", [edit for _, edit in LIES], ids=[name for name, _ in LIES])
def test_every_lie_is_a_corrupt_packet(make_packet, lie):
    data = rewrite(make_packet(0, layers=2, heads=3).to_bytes(), lie)
    with pytest.raises(CorruptPacketError):
        KVPacket.from_bytes(data)
    packet = decode_or_corrupt(data, verify=False)  # structurally valid lies only pass without the digest
    assert packet is None or packet.keys.shape == packet.values.shape


@pytest.mark.parametrize("form", ["int8", "int4"])
@pytest.mark.parametrize("lie", [edit for _, edit in QUANTIZED_LIES], ids=[name for name, _ in QUANTIZED_LIES])
def test_every_quantized_lie_is_a_corrupt_packet(make_packet, lie, form):
    data = rewrite(encode_packet(make_packet(0), form), lie)
    for verify in (True, False):
        with pytest.raises(CorruptPacketError):
            KVPacket.from_bytes(data, verify=verify)


def test_deeply_nested_or_huge_numbers_in_the_header(make_packet):
    _, body = split(make_packet(0).to_bytes())
    for header in (DEEP_JSON, b'{"keys": {"shape": [' + b"9" * 5000 + b"]}}", b'{"keys": NaN}'):
        with pytest.raises(CorruptPacketError, match="header|not valid JSON|kvpacket/1"):
            KVPacket.from_bytes(join(header, body))


def test_the_digest_covers_shapes_and_adapter_sizes(make_packet):
    packet = make_packet(0, layers=2, heads=3)
    data = packet.to_bytes()
    for name, lie in LIES:
        if name in ("layers <-> heads", "heads <-> head_dim", "adapter sizes moved"):
            assert decode_or_corrupt(rewrite(data, lie), verify=False) is not None  # a consistent lie ...
            with pytest.raises(CorruptPacketError, match="checksum"):  # ... that the digest catches
                KVPacket.from_bytes(rewrite(data, lie))


def test_files_written_before_the_digest_are_still_read(tmp_path, make_packet):
    packet = make_packet(0)
    data = legacy_bytes(packet)
    assert "digest" not in split(data)[0]["__metadata__"]
    assert torch.equal(KVPacket.from_bytes(data).keys, packet.keys)
    flipped = bytearray(data)
    flipped[-30] ^= 1
    with pytest.raises(CorruptPacketError, match="checksum"):
        KVPacket.from_bytes(flipped)
    store = LocalStore(tmp_path / "s")
    store.path_of(packet.key).parent.mkdir(parents=True)
    store.path_of(packet.key).write_bytes(data)  # a store written by the older version
    assert store.get(packet.key).key == packet.key and store.verify() == []


def test_verify_reports_and_quarantines_every_lying_entry(tmp_path, make_packet):
    packets = [make_packet(seed, layers=2, heads=3) for seed in range(len(LIES) + 1)]
    store = LocalStore(tmp_path / "s")
    keys = [store.put(p) for p in packets]
    for key, (_, lie) in zip(keys, LIES):
        path = store.path_of(key)
        path.write_bytes(rewrite(path.read_bytes(), lie))
    good = keys[-1]
    bad = store.verify()
    assert sorted(b.key for b in bad) == sorted(keys[:-1]) and {b.action for b in bad} == {"reported"}
    assert all(store.path_of(k).exists() for k in keys)  # reporting changes nothing
    bad = store.verify(quarantine=True)
    assert len(bad) == len(LIES) and {b.action for b in bad} == {"quarantined"}
    assert len(list((tmp_path / "s" / "quarantine").glob("*.kvp"))) == len(LIES)
    assert list(store.keys()) == [good] and store.get(good).key == good
    assert store.verify() == []


def test_get_of_a_lying_entry_raises_typed_and_quarantines(tmp_path, make_packet):
    store = LocalStore(tmp_path / "s")
    key = store.put(make_packet(0))
    path = store.path_of(key)
    path.write_bytes(rewrite(path.read_bytes(), LIES[1][1]))
    with pytest.raises(CorruptPacketError, match="quarantine"):
        store.get(key)
    assert store.get_many([key]) == [None] and store.stats()["corrupt"] == 1


def test_a_signed_store_refuses_unsigned_and_foreign_signed_packets(tmp_path, make_packet, monkeypatch):
    signed = LocalStore(tmp_path / "s", signing_key=KEY)
    plain = LocalStore(tmp_path / "s", signing_key="")
    mine, planted = make_packet(0), make_packet(1)
    signed.put(mine)
    plain.put(planted)  # written without the key (or by anyone with write access)
    assert plain.get(mine.key).key == mine.key  # the digest still checks damage without the key
    assert signed.get(mine.key).key == mine.key and signed.stats()["signed"]
    with pytest.raises(UntrustedPacketError, match="not signed"):
        signed.get(planted.key)
    assert signed.get_many([planted.key]) == [None]  # quarantined: the next lookup misses and rebuilds
    monkeypatch.setenv("KVPACKET_STORE_KEY", "another-secret-key-of-enough-bytes")
    other = open_store(tmp_path / "s")  # the key comes from the environment
    with pytest.raises(UntrustedPacketError, match="another key"):
        other.get(mine.key)
    with pytest.raises(ValueError, match="at least 16"):
        LocalStore(tmp_path / "s", signing_key="short")
