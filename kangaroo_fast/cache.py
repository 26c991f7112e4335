"""A static KV cache: buffers allocated once, a length per sequence; rejecting drafts only moves a length."""
from __future__ import annotations

import torch


class StaticKVCache:
    """Keys and values for ``num_layers`` layers as [num_layers, B, Hkv, max_len, D] buffers.

    Positions at or beyond a sequence's length hold stale values that attention never reads: a later write at
    the same position overwrites them. Nothing is copied or reallocated after construction, except that
    ``keep_rows`` moves the rows of unfinished sequences to the front when others finish, so that the ops run
    on the leading ``active`` rows only.
    """

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        if max_len < 1:
            raise ValueError(f"max_len={max_len} must be >= 1")
        shape = (num_layers, batch, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.int64, device=device)
        self._active = 0
        self.active = batch

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views [active, Hkv, max_len, D] of one layer's keys and values.

        The views are made once per number of active rows and kept: a compiled step (``graphs.py``) then takes
        each layer's view as an input of its own and writes into it in place; a view made inside the step would
        make the compiled step write the whole [layers, ...] buffer back after each layer."""
        return self._views[index]

    def reset(self, active: int | None = None) -> None:
        """Forget every sequence; the first ``active`` rows (all by default) are in use."""
        active = self.batch if active is None else active
        if not 1 <= active <= self.batch:
            raise ValueError(f"active={active} must lie in 1..{self.batch} (the cache's batch)")
        self.lengths.zero_()
        self.active = active

    def keep_rows(self, rows: list[int]) -> None:
        """Move the given active rows, in this order, to the front and make them the only active ones."""
        if not rows or any(not 0 <= r < self.active for r in rows):
            raise ValueError(f"rows={rows} must be a non-empty list of active rows 0..{self.active - 1}")
        if rows != list(range(len(rows))):
            index = torch.tensor(rows, device=self.k.device)
            n = len(rows)
            self.k[:, :n] = self.k[:, index]
            self.v[:, :n] = self.v[:, index]
            self.lengths[:n] = self.lengths[index]
        self.active = len(rows)

    @property
    def active(self) -> int:
        """The leading rows in use."""
        return self._active

    @active.setter
    def active(self, active: int) -> None:
        if active != self._active:
            self._views = [(self.k[i, :active], self.v[i, :active]) for i in range(self.k.shape[0])]
        self._active = active
