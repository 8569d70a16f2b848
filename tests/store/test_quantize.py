"""Packet quantization: error bounds, sizes, file round trip, damage."""

from __future__ import annotations

import pytest
import torch

from kvpacket_rag.errors import CorruptPacketError
from kvpacket_rag.packet import KVPacket, QuantizedPacket
from kvpacket_rag.packet import encode_packet, reconstruction_error
from kvpacket_rag.quantize import quantize


@pytest.mark.parametrize("bits", [8, 4])
def test_error_is_at_most_half_a_step_per_channel(bits, make_packet):
    x = make_packet(2, tokens=100).keys  # per-channel offsets, as real keys have
    q = quantize(x, bits)
    assert q.scale.shape == (x.shape[0], x.shape[1], 1, x.shape[3])  # per (layer, head, channel)
    step = (x.amax(2, keepdim=True) - x.amin(2, keepdim=True)) / (2**bits - 1)
    error = (q.dequantize() - x).abs()
    assert torch.all(error <= step / 2 * (1 + 1e-5) + 1e-6)
    assert q.codes.shape[-1] == x.shape[-1] * bits // 8


def test_grid_values_and_constant_channels_are_exact():
    grid = torch.arange(16, dtype=torch.float32).repeat(2, 1, 2, 1).reshape(2, 1, 32, 1).expand(2, 1, 32, 4) * 0.5 - 3
    constant = torch.full((1, 2, 5, 4), 1.25)
    for bits in (8, 4):
        torch.testing.assert_close(quantize(grid.contiguous(), bits).dequantize(), grid, atol=1e-6, rtol=0)
        assert torch.equal(quantize(constant, bits).dequantize(), constant)


def test_quantized_file_round_trip_keeps_key_and_dtype(make_packet):
    for dtype in (torch.float32, torch.bfloat16):
        packet = make_packet(4, dtype=dtype)
        for form in ("int8", "int4"):
            restored = KVPacket.from_bytes(encode_packet(packet, form))
            assert restored.key == packet.key and restored.dtype == dtype and restored.quantization == "none"
            assert torch.equal(restored.token_ids, packet.token_ids)
    errors8, errors4 = reconstruction_error(make_packet(4), "int8"), reconstruction_error(make_packet(4), "int4")
    assert errors8["keys_rel_rms"] < 0.01 and errors4["keys_rel_rms"] < 0.15
    assert errors8["values_rel_rms"] < errors4["values_rel_rms"]


def test_int8_is_at_most_52_percent_of_bf16_for_a_default_model_packet(make_packet):
    """SmolLM2-135M shape (30 layers, 3 KV heads, head dim 64), 512 tokens + 8 + 8 adapter positions."""
    packet = make_packet(0, tokens=512, layers=30, heads=3, head_dim=64, n_header=8, n_trailer=8, dtype=torch.bfloat16)
    bf16 = len(encode_packet(packet))
    assert len(encode_packet(packet, "int8")) <= 0.52 * bf16
    assert len(encode_packet(packet, "int4")) <= 0.27 * bf16


def test_damaged_quantized_file_is_refused(make_packet):
    data = bytearray(encode_packet(make_packet(1), "int4"))
    data[-20] ^= 0x01
    with pytest.raises(CorruptPacketError, match="checksum"):
        KVPacket.from_bytes(data)


def test_bad_arguments(make_packet):
    with pytest.raises(ValueError, match="unknown quantization"):
        encode_packet(make_packet(0), "int3")
    with pytest.raises(ValueError, match="even head_dim"):
        quantize(torch.zeros(1, 1, 4, 5), 4)


def reference_dequantize(q, dtype):
    """The definition, spelled out: unpack nibbles (channel 2i low), float32 code * scale + zero, one cast."""
    codes = q.codes.to(torch.int64)
    if q.bits == 4:
        codes = torch.stack((codes & 0x0F, codes >> 4), dim=-1).flatten(-2)
    return (codes.to(torch.float32) * q.scale + q.zero).to(dtype)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_decode_path_gives_the_reference_bits(bits, dtype, make_packet):
    q = quantize(make_packet(3, tokens=40, head_dim=16).keys, bits)
    want = reference_dequantize(q, dtype)
    assert torch.equal(q.dequantize(dtype), want)
    work = torch.full((q.codes.numel() * 8 // bits + 7,), float("nan"))  # larger than needed, dirty
    assert torch.equal(q.dequantize(dtype, work=work), want)
    buffer = torch.zeros(q.shape[0], 1, q.shape[1], q.shape[2] + 9, q.shape[3], dtype=dtype)  # an assembly buffer
    out = buffer[:, 0, :, 5 : 5 + q.shape[2]]  # strided slice, as assembly writes
    assert q.dequantize(out=out, work=work) is out
    assert torch.equal(out, want) and not buffer[:, 0, :, :5].any() and not buffer[:, 0, :, 5 + q.shape[2] :].any()


@pytest.mark.parametrize("form", ["int8", "int4"])
def test_quantized_file_decodes_without_copying_the_codes(form, make_packet):
    packet = make_packet(5, tokens=200, dtype=torch.bfloat16)
    data = bytearray(encode_packet(packet, form))
    restored = KVPacket.from_bytes(data)
    assert isinstance(restored, QuantizedPacket) and restored.encoding == form
    assert restored.key == packet.key and restored.length == packet.length and restored.dtype == torch.bfloat16
    codes = restored.quantized_keys.codes
    offset = codes.data_ptr() - torch.frombuffer(data, dtype=torch.uint8).data_ptr()
    assert 0 < offset < len(data)  # the codes are a view of the file's bytes
    assert restored.nbytes < packet.nbytes * (0.6 if form == "int8" else 0.35)
    assert torch.equal(restored.keys, reference_dequantize(restored.quantized_keys, torch.bfloat16))
    again = KVPacket.from_bytes(encode_packet(restored, form))  # written back from its codes, not re-quantized
    assert torch.equal(again.quantized_values.codes, restored.quantized_values.codes) and again.key == packet.key
    plain = restored.dequantized()
    assert type(plain) is KVPacket and plain.key == packet.key and torch.equal(plain.values, restored.values)
