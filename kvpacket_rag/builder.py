"""Building KV packets: one frozen-model forward per wrapped chunk (one per calibration context, averaged,
when the adapter carries calibration contexts)."""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicCache

from .adapter import PREFIX_PREAMBLE, PacketAdapter
from .errors import ContextTooLongError, EmptyInputError
from .models import LoadedModel
from .packet import KVPacket, packet_key
from .prompt import PromptFormatter
from .rope import rotate_keys


class PacketBuilder:
    """Turns chunk texts into immutable `KVPacket`s.

    Args:
        model: the frozen model.
        adapter: header/trailer soft tokens; None means the 0+0 adapter (bare chunks). It is read as it is at
            construction (its fingerprint is computed once): after changing it in place, make a new builder.
        formatter: tokenizes chunks exactly as the engine will.
        batch_tokens: padded tokens per forward when building many chunks at once.

    Example:
        >>> builder = PacketBuilder(model, adapter, PromptFormatter(model.tokenizer))
        >>> packet = builder.build("Ada Lovelace was born in London.")
    """

    def __init__(self, model: LoadedModel, adapter: PacketAdapter | None, formatter: PromptFormatter,
                 batch_tokens: int = 4096):
        self.model = model
        self.adapter = adapter if adapter is not None else PacketAdapter.empty(model)
        self.adapter.check_model(model)
        self.formatter = formatter
        self.batch_tokens = batch_tokens
        self.prefix_ids = formatter.preamble_ids() if self.adapter.prefix == PREFIX_PREAMBLE else []
        self.build_prefixes = [self.prefix_ids + list(ids) for ids in self.adapter.calibration] or [self.prefix_ids]
        """What each chunk is built after: the prefix, followed by each calibration context in turn."""
        self._prefix_kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.adapter_fingerprint = self._provenance()
        """What the packets' provenance records (hashed once: it is read for every packet key and fetch)."""

    def _kind(self) -> str:
        """``calibrated``, ``adapter``, ``exact`` (no adapter, after the preamble) or ``bare``, for progress bars."""
        if self.adapter.calibration:
            return "calibrated"
        if not self.adapter.is_empty:
            return "adapter"
        return "exact" if self.prefix_ids else "bare"

    def _provenance(self) -> str:
        """The adapter's fingerprint, plus a digest of the prefix token ids when packets are built after the
        preamble (another system prompt: other packets)."""
        if not self.prefix_ids:
            return self.adapter.fingerprint
        ids = torch.tensor(self.prefix_ids, dtype=torch.int64).numpy().tobytes()
        return f"{self.adapter.fingerprint}@{hashlib.sha256(ids).hexdigest()[:16]}"

    def chunk_ids(self, text: str) -> list[int]:
        """Token ids of a chunk, validated against the model's context.

        Raises:
            EmptyInputError, ContextTooLongError.
        """
        ids = self.formatter.chunk_ids(text)
        self._check_length(len(ids))
        return ids

    def _check_length(self, n_tokens: int) -> None:
        if n_tokens == 0:
            raise EmptyInputError("a chunk tokenized to nothing; drop it before building packets")
        total = max(map(len, self.build_prefixes)) + self.adapter.n_header + n_tokens + self.adapter.n_trailer
        if total > self.model.max_positions:
            raise ContextTooLongError(
                f"a chunk of {n_tokens} tokens (+{total - n_tokens} adapter tokens) exceeds the model's "
                f"{self.model.max_positions} positions; split the document into smaller chunks."
            )

    def key_for(self, token_ids: Sequence[int]) -> str:
        """The packet key the chunk's packet has (or will have) under this model and adapter."""
        return packet_key(token_ids, self.model.fingerprint, self.model.tokenizer_fingerprint,
                          self.adapter_fingerprint, self.model.dtype)

    def build(self, chunk: str | Sequence[int]) -> KVPacket:
        """Build the packet of one chunk (text, or token ids from `chunk_ids`)."""
        return self.build_many([chunk])[0]

    @torch.no_grad()
    def build_many(self, chunks: Sequence[str | Sequence[int]], progress: bool = False) -> list[KVPacket]:
        """Build packets for many chunks, batching chunks of similar length.

        Returns packets in the order of ``chunks``. Each packet equals the one `build` gives alone
        (padding is on the right, and attention is causal).
        """
        id_lists = [self.chunk_ids(c) if isinstance(c, str) else list(c) for c in chunks]
        for ids in id_lists:
            self._check_length(len(ids))
        order = sorted(range(len(id_lists)), key=lambda i: len(id_lists[i]))
        packets: list[KVPacket | None] = [None] * len(id_lists)
        bar = tqdm(total=len(order), desc=f"building {self._kind()} packets", unit="chunk", disable=not progress)
        start = 0
        while start < len(order):
            batch = self._next_batch(order, id_lists, start)
            for index, packet in zip(batch, self._forward([id_lists[i] for i in batch])):
                packets[index] = packet
            start += len(batch)
            bar.update(len(batch))
        bar.close()
        return packets  # type: ignore[return-value]

    def _next_batch(self, order: list[int], id_lists: list[list[int]], start: int) -> list[int]:
        batch = [order[start]]
        extra = self.adapter.n_header + self.adapter.n_trailer
        for index in order[start + 1 :]:
            longest = len(id_lists[index]) + extra  # sorted by length: the newest is the longest
            if longest * (len(batch) + 1) > self.batch_tokens:
                break
            batch.append(index)
        return batch

    def _forward(self, id_lists: list[list[int]]) -> list[KVPacket]:
        model = self.model
        wrapped = [self.adapter.wrap(model.embed(torch.tensor(ids))) for ids in id_lists]
        lengths = [w.shape[0] for w in wrapped]
        embeds = torch.zeros(len(wrapped), max(lengths), model.hidden_size, dtype=model.dtype, device=model.device)
        for row, (w, n) in enumerate(zip(wrapped, lengths)):
            embeds[row, :n] = w
        keys = values = 0.0
        for index in range(len(self.build_prefixes)):  # the mean over calibration contexts (one pass without)
            prefix_keys, prefix_values = self._after_prefix(index, embeds, lengths)
            keys, values = keys + prefix_keys, values + prefix_values
        if len(self.build_prefixes) > 1:
            keys, values = keys / len(self.build_prefixes), values / len(self.build_prefixes)
        return [
            KVPacket(keys[row, :, :, :n].cpu().clone(), values[row, :, :, :n].cpu().clone(),
                     torch.tensor(ids, dtype=torch.int64), self.adapter.n_header, self.adapter.n_trailer,
                     model.fingerprint, model.tokenizer_fingerprint, self.adapter_fingerprint)
            for row, (ids, n) in enumerate(zip(id_lists, lengths))
        ]

    def _after_prefix(self, index: int, embeds: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (at local positions ``0..T-1``) and values ``[B, layers, kv_heads, T, head_dim]`` of the wrapped
        chunks ``embeds [B, T, hidden]`` (row ``b`` holds ``lengths[b]`` tokens, then padding) built after
        build prefix ``index``."""
        model, (batch, longest, _) = self.model, embeds.shape
        offset = len(self.build_prefixes[index])
        mask = torch.zeros(batch, offset + longest, dtype=torch.long, device=model.device)
        mask[:, :offset] = 1
        for row, n in enumerate(lengths):
            mask[row, offset : offset + n] = 1
        positions = torch.arange(offset, offset + longest, device=model.device).expand(batch, -1)
        cache = self._prefix_cache(index, batch)
        with self.adapter.building(model):  # every input position is a wrapped-chunk token
            output = model.model.model(inputs_embeds=embeds, attention_mask=mask if batch > 1 else None,
                                       position_ids=positions, cache=cache, use_cache=True)
        keys = torch.stack([layer.keys[:, :, offset:] for layer in output.cache.layers], dim=1)
        values = torch.stack([layer.values[:, :, offset:] for layer in output.cache.layers], dim=1)
        if offset:
            keys = rotate_keys(keys, -offset, model.rope)  # stored at local positions 0..T-1, like every packet
        return keys, values

    def _prefix_cache(self, index: int, batch: int) -> DynamicCache | None:
        """A cache holding build prefix ``index``'s keys/values for ``batch`` rows (None for an empty prefix)."""
        if not self.build_prefixes[index]:
            return None
        if index not in self._prefix_kv:
            ids = torch.tensor([self.build_prefixes[index]], device=self.model.device)
            output = self.model.model.model(input_ids=ids, use_cache=True)
            self._prefix_kv[index] = [(layer.keys, layer.values) for layer in output.cache.layers]
        cache = DynamicCache()
        for layer, (keys, values) in enumerate(self._prefix_kv[index]):
            cache.update(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1), layer)
        return cache
