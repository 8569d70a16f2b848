"""The kvpacket/1 file format: round trip, content addressing, corruption and foreign packets."""

from __future__ import annotations

import pytest
import torch

from kvpacket_rag.adapter import PacketAdapter
from kvpacket_rag.builder import PacketBuilder
from kvpacket_rag.errors import CorruptPacketError, IncompatiblePacketError
from kvpacket_rag.packet import KVPacket, packet_key
from kvpacket_rag.prompt import PromptFormatter


@pytest.fixture(scope="module")
def packet(tiny_llama) -> KVPacket:
    builder = PacketBuilder(tiny_llama, PacketAdapter.initialize(tiny_llama, 2, 3), PromptFormatter(tiny_llama.tokenizer))
    return builder.build("Marie Curie won two Nobel prizes.")


def test_round_trip_is_exact_and_zero_copy(packet, tmp_path):
    data = bytearray(packet.to_bytes())
    loaded = KVPacket.from_bytes(data)
    assert loaded.key == packet.key and loaded.n_header == 2 and loaded.n_trailer == 3
    assert torch.equal(loaded.keys, packet.keys) and torch.equal(loaded.values, packet.values)
    assert torch.equal(loaded.token_ids, packet.token_ids)
    assert loaded.keys.untyped_storage().data_ptr() >= torch.frombuffer(data, dtype=torch.uint8).data_ptr()
    path = packet.save(tmp_path / "p.kvp")
    assert KVPacket.load(path).key == packet.key


def test_bfloat16_round_trip(packet):
    half = KVPacket(packet.keys.bfloat16(), packet.values.bfloat16(), packet.token_ids, packet.n_header,
                    packet.n_trailer, packet.model_fingerprint, packet.tokenizer_fingerprint, packet.adapter_fingerprint)
    loaded = KVPacket.from_bytes(half.to_bytes())
    assert loaded.dtype == torch.bfloat16 and torch.equal(loaded.keys, half.keys)
    assert loaded.key != packet.key  # dtype is part of the address


def test_key_depends_on_everything_the_bytes_depend_on(packet):
    base = dict(token_ids=packet.token_ids, model_fingerprint="m", tokenizer_fingerprint="t",
                adapter_fingerprint="a", dtype=torch.float32)
    key = packet_key(**base)
    for field, other in [("token_ids", packet.token_ids[:-1]), ("model_fingerprint", "m2"),
                         ("tokenizer_fingerprint", "t2"), ("adapter_fingerprint", "a2"), ("dtype", torch.bfloat16)]:
        assert packet_key(**{**base, field: other}) != key
    assert packet_key(**base, quantization="int8") != key


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_damaged_bytes_raise_corrupt_packet_error(packet, damage):
    data = bytearray(packet.to_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[-100] ^= 0xFF
    elif damage == "garbage":
        data = bytearray(b"not a packet at all" * 10)
    else:
        data = bytearray()
    with pytest.raises(CorruptPacketError):
        KVPacket.from_bytes(data)


def test_missing_file_says_how_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="kvpacket build"):
        KVPacket.load(tmp_path / "nope.kvp")


def test_foreign_packet_is_refused(packet):
    packet.check_compatible(packet.model_fingerprint, packet.tokenizer_fingerprint, packet.adapter_fingerprint)
    with pytest.raises(IncompatiblePacketError, match="another model"):
        packet.check_compatible("0" * 64, packet.tokenizer_fingerprint, packet.adapter_fingerprint)
    with pytest.raises(IncompatiblePacketError, match="another adapter"):
        packet.check_compatible(packet.model_fingerprint, packet.tokenizer_fingerprint, "none")
