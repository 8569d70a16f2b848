"""Building KV packets: one frozen-model forward per wrapped chunk (one per calibration context, averaged,
when the adapter or the builder's neighbour contexts give calibration contexts)."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Sequence

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicCache

from .adapter import PREFIX_PREAMBLE, PacketAdapter
from .errors import ContextTooLongError, EmptyInputError
from .models import LoadedModel
from .packet import KVPacket, packet_key
from .prompt import PromptFormatter
from .rope import rotate_keys

if TYPE_CHECKING:
    from .calibration import NeighbourContexts


class PacketBuilder:
    """Turns chunk texts into immutable `KVPacket`s.

    Args:
        model: the frozen model.
        adapter: header/trailer soft tokens; None means the 0+0 adapter (bare chunks). It is read as it is at
            construction (its fingerprint is computed once): after changing it in place, make a new builder.
        formatter: tokenizes chunks exactly as the engine will.
        batch_tokens: padded tokens per forward when building many chunks at once.
        neighbours: build each chunk after its own calibration contexts, drawn from its nearest passages of a
            corpus (see `kvpacket_rag.calibration.NeighbourContexts`), instead of the adapter's shared ones; the
            adapter must then carry none. Context tokens that would not fit the model's positions before the
            chunk are dropped from the context's start.

    Example:
        >>> builder = PacketBuilder(model, adapter, PromptFormatter(model.tokenizer))
        >>> packet = builder.build("Ada Lovelace was born in London.")
    """

    def __init__(self, model: LoadedModel, adapter: PacketAdapter | None, formatter: PromptFormatter,
                 batch_tokens: int = 4096, neighbours: NeighbourContexts | None = None):
        self.model = model
        self.adapter = adapter if adapter is not None else PacketAdapter.empty(model)
        self.adapter.check_model(model)
        if neighbours is not None and self.adapter.calibration:
            raise ValueError("the adapter already carries calibration contexts; build with neighbour contexts from "
                             "the adapter without them (PacketAdapter.with_calibration([]))")
        self.neighbours = neighbours
        self.formatter = formatter
        self.batch_tokens = batch_tokens
        self.prefix_ids = formatter.preamble_ids() if self.adapter.prefix == PREFIX_PREAMBLE else []
        self.build_prefixes = [self.prefix_ids + list(ids) for ids in self.adapter.calibration] or [self.prefix_ids]
        """What each chunk is built after: the prefix, followed by each calibration context in turn."""
        self._prefix_kv: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.adapter_fingerprint = self._provenance()
        """What the packets' provenance records (hashed once: it is read for every packet key and fetch)."""

    def _kind(self) -> str:
        """``calibrated``, ``adapter``, ``exact`` (no adapter, after the preamble) or ``bare``, for progress bars."""
        if self.adapter.calibration or self.neighbours is not None:
            return "calibrated"
        if not self.adapter.is_empty:
            return "adapter"
        return "exact" if self.prefix_ids else "bare"

    def _provenance(self) -> str:
        """The adapter's fingerprint, plus a digest of the prefix token ids when packets are built after the
        preamble (another system prompt: other packets), plus the neighbour contexts' fingerprint."""
        provenance = self.adapter.fingerprint
        if self.prefix_ids:
            ids = torch.tensor(self.prefix_ids, dtype=torch.int64).numpy().tobytes()
            provenance += f"@{hashlib.sha256(ids).hexdigest()[:16]}"
        if self.neighbours is not None:
            provenance += f"~{self.neighbours.fingerprint[:16]}"
        return provenance

    def provenance_for(self, token_ids: Sequence[int]) -> str:
        """What the chunk's packet records as its adapter: `adapter_fingerprint`, plus a digest of the chunk's own
        contexts when they are drawn from its nearest passages."""
        if self.neighbours is None:
            return self.adapter_fingerprint
        return f"{self.adapter_fingerprint}:{self.neighbours.digest(token_ids)[:16]}"

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
        longest_prefix = len(self.prefix_ids) if self.neighbours is not None else max(map(len, self.build_prefixes))
        total = longest_prefix + self.adapter.n_header + n_tokens + self.adapter.n_trailer
        if total > self.model.max_positions:
            raise ContextTooLongError(
                f"a chunk of {n_tokens} tokens (+{total - n_tokens} adapter tokens) exceeds the model's "
                f"{self.model.max_positions} positions; split the document into smaller chunks."
            )

    def key_for(self, token_ids: Sequence[int]) -> str:
        """The packet key the chunk's packet has (or will have) under this model and adapter."""
        return packet_key(token_ids, self.model.fingerprint, self.model.tokenizer_fingerprint,
                          self.provenance_for(token_ids), self.model.dtype)

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
        if self.neighbours is None:
            keys, values = self._mean_after(self.build_prefixes, embeds, lengths, memo=True)
        else:  # each chunk after its own contexts
            rows = [self._mean_after(self._neighbour_prefixes(ids, n), embeds[row : row + 1, :n], [n], memo=False)
                    for row, (ids, n) in enumerate(zip(id_lists, lengths))]
            keys = [k[0] for k, _ in rows]
            values = [v[0] for _, v in rows]
        return [
            KVPacket(keys[row][:, :, :n].cpu().clone(), values[row][:, :, :n].cpu().clone(),
                     torch.tensor(ids, dtype=torch.int64), self.adapter.n_header, self.adapter.n_trailer,
                     model.fingerprint, model.tokenizer_fingerprint, self.provenance_for(ids))
            for row, (ids, n) in enumerate(zip(id_lists, lengths))
        ]

    def _neighbour_prefixes(self, ids: list[int], n_wrapped: int) -> list[list[int]]:
        """The build prefixes of one chunk under neighbour contexts, each context cut from its start to fit."""
        room = self.model.max_positions - len(self.prefix_ids) - n_wrapped
        return [self.prefix_ids + context[max(0, len(context) - room) :] if room else self.prefix_ids
                for context in self.neighbours.contexts_for(ids)] or [self.prefix_ids]

    def _mean_after(self, prefixes: list[list[int]], embeds: torch.Tensor, lengths: list[int],
                    memo: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean over ``prefixes`` of `_after_prefix` (one pass for one prefix)."""
        keys = values = 0.0
        for prefix in prefixes:
            prefix_keys, prefix_values = self._after_prefix(prefix, embeds, lengths, memo)
            keys, values = keys + prefix_keys, values + prefix_values
        if len(prefixes) > 1:
            keys, values = keys / len(prefixes), values / len(prefixes)
        return keys, values

    def _after_prefix(self, prefix: list[int], embeds: torch.Tensor, lengths: list[int],
                      memo: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (at local positions ``0..T-1``) and values ``[B, layers, kv_heads, T, head_dim]`` of the wrapped
        chunks ``embeds [B, T, hidden]`` (row ``b`` holds ``lengths[b]`` tokens, then padding) built after the
        token ids ``prefix`` (their keys/values kept for later calls when ``memo``)."""
        model, (batch, longest, _) = self.model, embeds.shape
        offset = len(prefix)
        mask = torch.zeros(batch, offset + longest, dtype=torch.long, device=model.device)
        mask[:, :offset] = 1
        for row, n in enumerate(lengths):
            mask[row, offset : offset + n] = 1
        positions = torch.arange(offset, offset + longest, device=model.device).expand(batch, -1)
        cache = self._prefix_cache(prefix, batch, memo)
        with self.adapter.building(model):  # every input position is a wrapped-chunk token
            output = model.model.model(inputs_embeds=embeds, attention_mask=mask if batch > 1 else None,
                                       position_ids=positions, cache=cache, use_cache=True)
        keys = torch.stack([layer.keys[:, :, offset:] for layer in output.cache.layers], dim=1)
        values = torch.stack([layer.values[:, :, offset:] for layer in output.cache.layers], dim=1)
        if offset:
            keys = rotate_keys(keys, -offset, model.rope)  # stored at local positions 0..T-1, like every packet
        return keys, values

    def _prefix_cache(self, prefix: list[int], batch: int, memo: bool) -> DynamicCache | None:
        """A cache holding ``prefix``'s keys/values for ``batch`` rows (None for an empty prefix)."""
        if not prefix:
            return None
        kv = self._prefix_kv.get(tuple(prefix))
        if kv is None:
            ids = torch.tensor([prefix], device=self.model.device)
            output = self.model.model.model(input_ids=ids, use_cache=True)
            kv = [(layer.keys, layer.values) for layer in output.cache.layers]
            if memo:
                self._prefix_kv[tuple(prefix)] = kv
        cache = DynamicCache()
        for layer, (keys, values) in enumerate(kv):
            cache.update(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1), layer)
        return cache
