"""KV storage shared by requests decoded together, and the one forward that advances several of them.

`BatchKV` holds keys and values ``[layers, rows, kv_heads, columns, head_dim]``: row ``i`` is one request's cache,
its positions ``0..n_i-1`` in columns ``0..n_i-1``. Rows of different lengths share the tensor (right padding);
columns past a row's length are never attended. A request's context is assembled straight into its row through
`BatchKV.row_buffer` (a `KVBuffer` view), so joining the batch copies nothing.

`forward_rows` runs new tokens of consecutive rows through the model in one forward: each row's tokens are
written at that row's own columns, carry that row's own RoPE position ids and attend only to that row's cache
(causally among themselves), so each row gets the logits it would get alone.
"""

from __future__ import annotations

from typing import Sequence

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


class _RowsLayer(DynamicLayer):
    """One layer of `_RowsCache`: scatters new keys/values to each row's own columns."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor,
                 span: int):
        super().__init__()
        self.store_keys, self.store_values, self.rows, self.columns, self.span = keys, values, rows, columns, span
        self.device, self.dtype, self.is_initialized = keys.device, keys.dtype, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # store[rows, :, columns] indexes [k, width, heads, dim]; states come as [k, heads, width, dim]
        self.store_keys[self.rows, :, self.columns] = key_states.transpose(1, 2)
        self.store_values[self.rows, :, self.columns] = value_states.transpose(1, 2)
        self.keys = self.store_keys[:, :, : self.span]
        self.values = self.store_values[:, :, : self.span]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.span


class _RowsCache(Cache):
    """A transformers `Cache` over rows ``start..start+k`` of a `BatchKV` for one `forward_rows` call."""

    def __init__(self, batch: BatchKV, start: int, columns: torch.Tensor, span: int):
        count = columns.shape[0]
        rows = torch.arange(count, device=columns.device)[:, None]
        end = start + count
        layers = [_RowsLayer(batch.keys[i, start:end], batch.values[i, start:end], rows, columns, span)
                  for i in range(batch.keys.shape[0])]
        super().__init__(layers=layers)


@torch.no_grad()
def forward_rows(batch: BatchKV, start: int, lengths: Sequence[int], tokens: Sequence[Sequence[int]]) -> torch.Tensor:
    """Run ``tokens[i]`` after the ``lengths[i]`` cached positions of row ``start + i``, all rows in one forward.

    Shorter token lists are padded; the padding's keys/values land past the row's new length, where nothing
    attends to them before they are overwritten. The caller advances each row's length by ``len(tokens[i])``.

    Returns:
        ``[len(tokens), vocab]`` logits of each row's last token.
    """
    model = batch.model
    device = model.device
    width = max(len(t) for t in tokens)
    batch.reserve(start + len(tokens), max(lengths) + width)
    ids = torch.tensor([list(t) + [t[-1]] * (width - len(t)) for t in tokens], device=device)
    positions = torch.tensor(list(lengths), device=device)[:, None] + torch.arange(width, device=device)
    span = int(positions.max()) + 1
    # row i, query j sees columns 0..lengths[i]+j: its own cache and its own earlier new tokens
    mask = torch.arange(span, device=device)[None, None, None, :] <= positions[:, None, :, None]
    cache = _RowsCache(batch, start, positions, span)
    hidden = model.model.model(input_ids=ids, position_ids=positions, attention_mask=mask, cache=cache,
                               use_cache=True).last_hidden_state
    last = torch.tensor([len(t) - 1 for t in tokens], device=device)
    return model.model.get_output_embeddings()(hidden[torch.arange(len(tokens), device=device), last])
