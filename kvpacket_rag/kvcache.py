"""A preallocated KV cache that packets are assembled into.

`KVBuffer` owns one ``[layers, 1, kv_heads, capacity, head_dim]`` key tensor and
one value tensor, reused across questions so that no fresh memory is touched
per question. `PacketCache` is a transformers `Cache` whose layers are views of
that buffer: the question prefill and every decoded token are written in place
instead of re-concatenating the whole context.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .models import LoadedModel
from .packet import KVPacket, QuantizedPacket
from .rope import RopeSpec, rotate_keys

Block = tuple[torch.Tensor, torch.Tensor] | KVPacket


class KVBuffer:
    """Reusable storage for assembled contexts of one model.

    Args:
        model: the model the cache serves (layer count, heads, head dim, dtype, device).
        capacity: initial number of positions; grows on demand.
    """

    def __init__(self, model: LoadedModel, capacity: int = 0):
        self.shape = (model.num_layers, 1, model.num_kv_heads, 0, model.head_dim)
        self.dtype, self.device = model.dtype, model.device
        self.keys = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        self.values = torch.empty_like(self.keys)
        self._scratch: dict[torch.dtype, torch.Tensor] = {}
        self.reserve(capacity)

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` positions (keeps no content when it grows)."""
        if capacity <= self.capacity:
            return
        layers, batch, heads, _, dim = self.shape
        capacity = max(capacity, int(self.capacity * 1.5))
        self.keys = torch.empty(layers, batch, heads, capacity, dim, dtype=self.dtype, device=self.device)
        self.values = torch.empty_like(self.keys)

    def scratch(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A reusable tensor of ``shape`` (contents undefined), kept between questions so that decoding
        quantized packets touches no fresh memory."""
        count = 1
        for dim in shape:
            count *= dim
        held = self._scratch.get(dtype)
        if held is None or held.numel() < count:
            held = self._scratch[dtype] = torch.empty(count, dtype=dtype, device=self.device)
        return held[:count].view(shape)


class PreallocatedLayer(DynamicLayer):
    """One layer of a `PacketCache`: writes new keys/values into a preallocated tensor in place."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        super().__init__()
        self.buffer_keys, self.buffer_values, self.length = keys, values, length
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]
        self.device, self.dtype, self.is_initialized = keys.device, keys.dtype, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self.buffer_keys.shape[-2]:
            self._grow(end)
        self.buffer_keys[:, :, self.length : end] = key_states
        self.buffer_values[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self.buffer_keys[:, :, :end], self.buffer_values[:, :, :end]
        return self.keys, self.values

    def _grow(self, needed: int) -> None:
        self.reserve(max(needed, 2 * self.buffer_keys.shape[-2]))

    def reserve(self, capacity: int) -> None:
        """Make room for exactly ``capacity`` positions when there is less (the cached positions are kept)."""
        if capacity <= self.buffer_keys.shape[-2]:
            return
        shape = list(self.buffer_keys.shape)
        shape[-2] = capacity
        for name in ("buffer_keys", "buffer_values"):
            old = getattr(self, name)
            new = old.new_empty(shape)
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)
        self.keys, self.values = self.buffer_keys[:, :, : self.length], self.buffer_values[:, :, : self.length]

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, max_length: int) -> None:
        if max_length < 0:
            max_length = self.length + max_length
        self.length = min(self.length, max_length)
        self.keys, self.values = self.buffer_keys[:, :, : self.length], self.buffer_values[:, :, : self.length]


class PacketCache(Cache):
    """A transformers `Cache` over a `KVBuffer` holding ``length`` assembled positions."""

    def __init__(self, buffer: KVBuffer, length: int):
        layers = [PreallocatedLayer(buffer.keys[i], buffer.values[i], length) for i in range(buffer.shape[0])]
        super().__init__(layers=layers)

    def truncate(self, length: int) -> None:
        """Forget the positions from ``length`` on: the next token is written at position ``length``."""
        for layer in self.layers:
            layer.crop(length)

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` positions in every layer, keeping the cached ones."""
        for layer in self.layers:
            layer.reserve(capacity)

    @property
    def nbytes(self) -> int:
        """Bytes of key/value storage this cache holds (its capacity, not only the positions in use)."""
        storages = {}
        for layer in self.layers:
            for tensor in (layer.buffer_keys, layer.buffer_values):
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())

    def to_block(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of the cached keys/values as ``[layers, kv_heads, length, head_dim]`` tensors."""
        keys = torch.stack([layer.keys[0] for layer in self.layers])
        values = torch.stack([layer.values[0] for layer in self.layers])
        return keys, values


def assemble(
    buffer: KVBuffer,
    blocks: list[Block],
    rope: RopeSpec,
    reserve: int = 0,
) -> PacketCache:
    """Concatenate KV blocks into ``buffer``, moving each block's keys to its global start.

    Each block is written in one pass from where it lies (a mapped file, a Redis reply, memory)
    into the buffer: values are copied, keys rotated on the way. A `QuantizedPacket` is decoded on
    the way too: values straight into the buffer, keys through a reused scratch tensor.

    Args:
        buffer: destination; grown to hold all blocks plus ``reserve`` positions.
        blocks: packets or ``(keys, values)`` pairs ``[layers, kv_heads, T_i, head_dim]``, each at local
            positions ``0..T_i-1`` (the preamble first). Block ``i`` lands at ``start_i = sum(T_j, j < i)``.
        rope: the model's RoPE description.
        reserve: positions to keep free for the question and the answer.

    Returns:
        A `PacketCache` of length ``sum(T_i)`` whose keys equal those computed at global positions
        (for quantized packets: those of the dequantized packet, bit for bit).
    """
    if buffer.device.type != "cpu":
        blocks = _stage_on_device([_tensors(block) for block in blocks], buffer.device)
    total = sum(_length(block) for block in blocks)
    buffer.reserve(total + reserve)
    start = 0
    for block in blocks:
        end = start + _length(block)
        keys_out, values_out = buffer.keys[:, 0, :, start:end], buffer.values[:, 0, :, start:end]
        if isinstance(block, QuantizedPacket):
            _decode_into(block, start, rope, buffer, keys_out, values_out)
        else:
            keys, values = _tensors(block)
            rotate_keys(keys.to(buffer.dtype), start, rope, out=keys_out)
            values_out.copy_(values)
        start = end
    return PacketCache(buffer, total)


def _decode_into(packet: QuantizedPacket, start: int, rope: RopeSpec, buffer: KVBuffer,
                 keys_out: torch.Tensor, values_out: torch.Tensor) -> None:
    """Dequantize ``packet`` into the buffer slices: values directly, keys via scratch and rotation.

    Keys are first restored in the packet's dtype, exactly as `QuantizedPacket.keys` would, so the
    result equals assembling the dequantized packet.
    """
    shape = packet.quantized_keys.shape
    work = buffer.scratch(shape, torch.float32)
    if packet.dtype == values_out.dtype:
        packet.quantized_values.dequantize(out=values_out, work=work)
    else:
        values_out.copy_(packet.quantized_values.dequantize(packet.dtype, work=work))
    keys = work if packet.dtype == torch.float32 else buffer.scratch(shape, packet.dtype)
    packet.quantized_keys.dequantize(out=keys, work=work)
    rotate_keys(keys.to(buffer.dtype), start, rope, out=keys_out)


def _tensors(block: Block) -> tuple[torch.Tensor, torch.Tensor]:
    return (block.keys, block.values) if isinstance(block, KVPacket) else block


def _length(block: Block) -> int:
    return block.length if isinstance(block, KVPacket) else block[0].shape[2]


def _stage_on_device(blocks: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device):
    """Move the host-resident blocks to ``device`` in one pinned, non-blocking copy; others pass through."""
    host = [n for n, (keys, _) in enumerate(blocks) if keys.device.type == "cpu"]
    if not host:
        return blocks
    lengths = [blocks[n][0].shape[2] for n in host]
    layers, heads, _, dim = blocks[host[0]][0].shape
    staging = torch.empty(2, layers, heads, sum(lengths), dim, dtype=blocks[host[0]][0].dtype, pin_memory=True)
    start = 0
    for n, length in zip(host, lengths):
        staging[0, :, :, start : start + length] = blocks[n][0]
        staging[1, :, :, start : start + length] = blocks[n][1]
        start += length
    moved = staging.to(device, non_blocking=True)
    out, start = list(blocks), 0
    for n, length in zip(host, lengths):
        out[n] = (moved[0, :, :, start : start + length], moved[1, :, :, start : start + length])
        start += length
    return out
