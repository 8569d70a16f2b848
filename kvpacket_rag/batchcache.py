"""KV storage shared by requests decoded together, and the one forward that advances several of them.

`BatchKV` holds keys and values ``[layers, rows, kv_heads, columns, head_dim]``: row ``i`` is one request's cache,
its positions ``0..n_i-1`` in columns ``0..n_i-1``. Rows of different lengths share the tensor (right padding);
columns past a row's length are never attended. A request's context is assembled straight into its row through
`BatchKV.row_buffer` (a `KVBuffer` view), so joining the batch copies nothing.

`forward_rows` runs new tokens of consecutive rows through the model in one forward, packed into one sequence
(one token for a row that decodes, a whole question for a row that joins): each row's tokens are written at that
row's own columns, carry that row's own RoPE position ids and attend only to that row's cache (causally among
themselves), so each row gets the logits it would get alone. A row's new tokens may also sit at positions inside its
cache: their fresh keys/values then replace the cached ones there, in every layer, before anything attends to them
(context tokens a method recomputes, run in the question's own forward).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .kvcache import KVBuffer
from .models import LoadedModel


class BatchKV:
    """Growable KV storage with one row per request (see the module docstring).

    Args:
        model: the model whose caches the rows hold (layers, KV heads, head dim, dtype, device).
    """

    def __init__(self, model: LoadedModel):
        self.model = model
        self._scratch: dict[torch.dtype, torch.Tensor] = {}
        self.release()

    @property
    def rows(self) -> int:
        return self.keys.shape[1]

    @property
    def columns(self) -> int:
        return self.keys.shape[3]

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    def reserve(self, rows: int, columns: int) -> None:
        """Make room for ``rows`` rows of ``columns`` positions, keeping every row's content."""
        if rows <= self.rows and columns <= self.columns:
            return
        rows = max(rows, 2 * self.rows) if rows > self.rows else self.rows
        columns = max(columns, int(self.columns * 1.5)) if columns > self.columns else self.columns
        layers, _, heads, _, dim = self.keys.shape
        for name in ("keys", "values"):
            old = getattr(self, name)
            # zeros, not empty: a row's attention gives unused columns weight 0, and 0 * NaN garbage would be NaN
            new = old.new_zeros(layers, rows, heads, columns, dim)
            new[:, : old.shape[1], :, : old.shape[3]] = old
            setattr(self, name, new)

    def release(self) -> None:
        """Drop the storage (the next request allocates afresh)."""
        model = self.model
        shape = (model.num_layers, 0, model.num_kv_heads, 0, model.head_dim)
        self.keys = torch.empty(shape, dtype=model.dtype, device=model.device)
        self.values = torch.empty_like(self.keys)
        self._scratch.clear()

    def row_buffer(self, row: int) -> "RowBuffer":
        """A `KVBuffer` whose storage is row ``row`` (grown to exist)."""
        self.reserve(row + 1, 0)
        return RowBuffer(self, row)

    def move_row(self, source: int, target: int, length: int) -> None:
        """Copy the first ``length`` positions of row ``source`` into row ``target``."""
        for tensor in (self.keys, self.values):
            tensor[:, target, :, :length] = tensor[:, source, :, :length]


class RowBuffer(KVBuffer):
    """One row of a `BatchKV` seen as a `KVBuffer`: context methods assemble into it as into any buffer.

    Growing it (`reserve`) grows the whole batch and keeps every row's content; a capacity beyond what the model
    attends to raises ContextTooLongError before anything is allocated.
    """

    def __init__(self, batch: BatchKV, row: int):  # shares the batch's storage: no allocation of its own
        self.batch, self.row = batch, row
        model = batch.model
        self.shape = (model.num_layers, 1, model.num_kv_heads, 0, model.head_dim)
        self.dtype, self.device = model.dtype, model.device
        self._scratch = batch._scratch
        self._point()

    def _point(self) -> None:
        self.keys = self.batch.keys[:, self.row : self.row + 1]
        self.values = self.batch.values[:, self.row : self.row + 1]

    def reserve(self, capacity: int) -> None:
        if capacity <= self.capacity:
            return
        self.batch.model.check_context(capacity, "context plus question and answer")
        self.batch.reserve(self.batch.rows, capacity)
        self._point()


class RowsAttention:
    """How the packed new tokens of `forward_rows` attend: each token to its own row's cache, up to its own position.

    Token ``t`` of the packed sequence belongs to row ``rows[t]`` (counted from the call's first row) and sits at
    column (= RoPE position) ``columns[t]``. Rows are attended in groups: each run of consecutive rows that add a
    single token (decode steps), and each run of rows that add several (prefills), padded to the longest of
    the run. Each group is one grouped-query SDPA over its rows' cache slices, so no row's cache is
    copied and a decode row is never padded to a prefill's width. A group of one row whose new tokens jump
    (tokens inside its cache, then its question) is attended in segments (`_segments`), each over the columns up to
    its own last position only.

    Args:
        positions: for each row, the ascending positions of its new tokens (>= 1 token per row).
    """

    def __init__(self, positions: Sequence[Sequence[int]], device: torch.device):
        widths = [len(p) for p in positions]
        offsets = [0]
        for width in widths:
            offsets.append(offsets[-1] + width)
        self.rows = torch.repeat_interleave(torch.arange(len(widths)), torch.tensor(widths)).to(device)
        self.columns = torch.tensor([p for row in positions for p in row], device=device)
        self.span = max(row[-1] for row in positions) + 1
        self.last_tokens = torch.tensor(offsets[1:], device=device) - 1
        self.mask_stub = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)  # the real masks are per group
        self.groups = [_RowGroup(positions[first:last], offsets[first:last], first, self.span, device)
                       for first, last in _runs([w > 1 for w in widths])]
        self._packed: dict[tuple[int, int], torch.Tensor] = {}  # (group, segment) -> mask made by `attend`'s pack_mask

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None,
               attention: Callable, pack_mask: Callable | None = None) -> torch.Tensor:
        """Attention output ``[1, tokens, heads, dim]`` of packed ``query [1, heads, tokens, dim]`` over the rows'
        caches ``key/value [rows, kv_heads, span, dim]``; ``attention`` is the model's batched grouped-query SDPA
        (``[B, H, q, D]`` queries, ``[B, 1, q, N]`` boolean mask or what ``pack_mask`` makes of it, returns
        ``[B, q, H, D]``). ``pack_mask`` runs once per segment and call of `forward_rows`: every layer attends with
        the same masks."""
        out = query.new_empty(query.shape[2], query.shape[1], query.shape[3])
        for g, group in enumerate(self.groups):
            rows = slice(group.first, group.last)
            for s, (slots, limit) in enumerate(group.segments):
                mask = group.mask[:, :, slots, :limit]
                if pack_mask is not None:
                    if (g, s) not in self._packed:
                        self._packed[g, s] = pack_mask(mask)
                    mask = self._packed[g, s]
                if group.start is not None:  # one row: its segment is a run of the packed tokens, no padding
                    run = slice(group.start + slots.start, group.start + slots.stop)
                    out[run] = attention(query[:, :, run], key[rows, :, :limit], value[rows, :, :limit], mask,
                                         scaling)[0]
                    continue
                tokens, real = group.tokens[:, slots], group.real[:, slots]
                grouped = query[0][:, tokens].transpose(0, 1)  # [rows, heads, width, dim]
                result = attention(grouped, key[rows, :, :limit], value[rows, :, :limit], mask,
                                   scaling)  # [rows, width, heads, dim]
                out[tokens[real]] = result[real]
        return out[None]


class _RowGroup:
    """Rows ``first..last-1`` attended together, padded to their longest new-token count."""

    def __init__(self, positions: Sequence[Sequence[int]], starts: Sequence[int], first: int, span: int,
                 device: torch.device):
        self.first, self.last = first, first + len(positions)
        counts = torch.tensor([len(p) for p in positions])
        width = int(counts.max())
        steps = torch.arange(width)
        self.real = (steps[None, :] < counts[:, None]).to(device)  # [rows, width]: padding slots are False
        # a padding slot repeats its row's last token (and position); its output is computed and dropped
        slot = torch.minimum(steps[None, :], counts[:, None] - 1)
        self.tokens = (torch.tensor(starts)[:, None] + slot).to(device)
        padded = torch.tensor([list(p) + [p[-1]] * (width - len(p)) for p in positions])  # [rows, width]
        # a new token sees its row's columns up to its own position: the cache and the row's earlier new tokens
        self.mask = (torch.arange(span)[None, None, None, :] <= padded[:, None, :, None]).to(device)
        self.segments = _segments(positions[0]) if len(positions) == 1 else [(slice(None), span)]
        self.start = starts[0] if len(positions) == 1 else None  # a lone row's first token in the packed sequence


SEGMENT_TOKENS = 8
"""Fewest new tokens of a row attended together when its positions jump (see `_segments`)."""


def _segments(positions: Sequence[int]) -> list[tuple[slice, int]]:
    """Split one row's ascending new-token positions where they jump, once a segment holds ``SEGMENT_TOKENS``:
    ``(slots, key columns)`` per segment. A segment's tokens attend to the columns up to its last position rather
    than the row's whole span (their masks hide the rest anyway), which saves the attention work of tokens that sit
    early in a long cache."""
    segments, first = [], 0
    for i in range(1, len(positions) + 1):
        if i == len(positions) or (positions[i] != positions[i - 1] + 1 and i - first >= SEGMENT_TOKENS):
            segments.append((slice(first, i), positions[i - 1] + 1))
            first = i
    return segments


def _runs(flags: Sequence[bool]) -> list[tuple[int, int]]:
    """``(first, last)`` index ranges of the maximal runs of equal consecutive flags."""
    runs, first = [], 0
    for i in range(1, len(flags) + 1):
        if i == len(flags) or flags[i] != flags[first]:
            runs.append((first, i))
            first = i
    return runs


class _RowsLayer(DynamicLayer):
    """One layer of `_RowsCache`: scatters each new token's key/value to its row's own column."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor,
                 span: int):
        super().__init__()
        self.store_keys, self.store_values, self.rows, self.columns, self.span = keys, values, rows, columns, span
        self.device, self.dtype, self.is_initialized = keys.device, keys.dtype, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # states come packed as [1, heads, tokens, dim]; store[rows, :, columns] indexes [tokens, heads, dim]
        self.store_keys[self.rows, :, self.columns] = key_states[0].transpose(0, 1)
        self.store_values[self.rows, :, self.columns] = value_states[0].transpose(0, 1)
        self.keys = self.store_keys[:, :, : self.span]
        self.values = self.store_values[:, :, : self.span]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.span


class _RowsCache(Cache):
    """A transformers `Cache` over rows ``start..start+k`` of a `BatchKV` for one `forward_rows` call."""

    def __init__(self, batch: BatchKV, start: int, rows: torch.Tensor, columns: torch.Tensor, span: int):
        end = start + int(rows.max()) + 1
        layers = [_RowsLayer(batch.keys[i, start:end], batch.values[i, start:end], rows, columns, span)
                  for i in range(batch.keys.shape[0])]
        super().__init__(layers=layers)


@torch.no_grad()
def forward_rows(batch: BatchKV, start: int, lengths: Sequence[int], tokens: Sequence[Sequence[int]],
                 positions: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """Run ``tokens[i]`` after the ``lengths[i]`` cached positions of row ``start + i``, all rows in one forward.

    The new tokens of all rows run packed, one after the other, through the model's layers, so a row decoding one
    token costs one token even beside rows prefilling a question: decode steps and prefills share one forward.
    Attention alone is per row (`RowsAttention`).

    Args:
        positions: for each row, the ascending positions of its tokens; default ``lengths[i], lengths[i] + 1, ...``.
            Tokens at positions below ``lengths[i]`` overwrite the row's cached keys/values there in every layer
            (each new token attends to the row up to its own position); the row's new length is its last
            position + 1, which the caller tracks.

    Returns:
        ``[len(tokens), vocab]`` logits of each row's last token.
    """
    model = batch.model
    if positions is None:
        positions = [range(n, n + len(t)) for n, t in zip(lengths, tokens)]
    positions = [list(p) for p in positions]
    if min(len(p) for p in positions) < 1:
        raise ValueError("every row needs at least one new token")
    if any(len(p) != len(t) for p, t in zip(positions, tokens)):
        raise ValueError("each row needs one position per new token")
    if any(b <= a for p in positions for a, b in zip(p, p[1:])):
        raise ValueError("a row's new token positions must ascend")
    batch.reserve(start + len(tokens), max(p[-1] + 1 for p in positions))
    plan = RowsAttention(positions, model.device)
    ids = torch.tensor([[token for row in tokens for token in row]], device=model.device)
    cache = _RowsCache(batch, start, plan.rows, plan.columns, plan.span)
    hidden = model.model.model(input_ids=ids, position_ids=plan.columns[None], attention_mask=plan.mask_stub,
                               cache=cache, use_cache=True, kvpacket_rows=plan).last_hidden_state
    return model.model.get_output_embeddings()(hidden[0, plan.last_tokens])
