"""Assembly: packets land rotated in the preallocated buffer, whatever form they are read in."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kvpacket_rag.builder import PacketBuilder
from kvpacket_rag.kvcache import KVBuffer, assemble
from kvpacket_rag.packet import KVPacket, QuantizedPacket
from kvpacket_rag.prompt import PromptFormatter
from kvpacket_rag.store import LocalStore

CHUNKS = ["Ada Lovelace was born in London in 1815.", "The Analytical Engine was designed by Charles Babbage.",
          "Grace Hopper wrote the first compiler."]


@pytest.fixture(scope="module")
def built(tiny_llama):
    builder = PacketBuilder(tiny_llama, None, PromptFormatter(tiny_llama.tokenizer))
    return builder.build_many([builder.chunk_ids(c) for c in CHUNKS])


def buffer_like(model, dtype: torch.dtype) -> KVBuffer:
    """A buffer of ``model``'s shape in ``dtype`` (the model itself is not run)."""
    shape = SimpleNamespace(num_layers=model.num_layers, num_kv_heads=model.num_kv_heads, head_dim=model.head_dim,
                            dtype=dtype, device=torch.device("cpu"))
    return KVBuffer(shape)


def assembled(buffer: KVBuffer, blocks, rope) -> tuple[torch.Tensor, torch.Tensor]:
    cache = assemble(buffer, blocks, rope, reserve=4)
    return cache.to_block()


def cast(packet: KVPacket, dtype: torch.dtype) -> KVPacket:
    return KVPacket(packet.keys.to(dtype), packet.values.to(dtype), packet.token_ids, packet.n_header,
                    packet.n_trailer, packet.model_fingerprint, packet.tokenizer_fingerprint, packet.adapter_fingerprint)


def test_assembly_from_mapped_files_equals_assembly_from_tensors(tiny_llama, built, tmp_path):
    store = LocalStore(tmp_path / "store")
    keys = [store.put(p) for p in built]
    mapped = store.get_many(keys)
    assert all(p.keys.data_ptr() != q.keys.data_ptr() for p, q in zip(mapped, built))  # views of the mapped files
    preamble = (built[0].keys[:, :, :3].clone(), built[0].values[:, :, :3].clone())
    want = assembled(KVBuffer(tiny_llama), [preamble, *[(p.keys.clone(), p.values.clone()) for p in built]],
                     tiny_llama.rope)
    got = assembled(KVBuffer(tiny_llama), [preamble, *mapped], tiny_llama.rope)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("form", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_assembly_equals_assembly_of_the_dequantized_packets(tiny_llama, built, tmp_path, form, dtype):
    store = LocalStore(tmp_path / "store", quantization=form)
    keys = [store.put(cast(p, dtype)) for p in built]
    read = store.get_many(keys)
    assert all(isinstance(p, QuantizedPacket) for p in read)
    plain = [p.dequantized() for p in read]
    buffer = buffer_like(tiny_llama, dtype)
    want = assembled(buffer_like(tiny_llama, dtype), plain, tiny_llama.rope)
    for _ in range(2):  # the second pass reuses the buffer's scratch
        got = assembled(buffer, read, tiny_llama.rope)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    mixed = assembled(buffer_like(tiny_llama, dtype), [plain[0], read[1], plain[2]], tiny_llama.rope)
    assert torch.equal(mixed[0], want[0]) and torch.equal(mixed[1], want[1])


def test_kv_bytes_per_position_is_what_the_buffer_holds_per_position(tiny_llama):
    buffer = KVBuffer(tiny_llama, 8)
    held = buffer.keys.numel() * buffer.keys.element_size() + buffer.values.numel() * buffer.values.element_size()
    assert tiny_llama.kv_bytes_per_position * buffer.capacity == held
