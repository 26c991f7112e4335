"""A static KV cache: buffers allocated once, a length per sequence; rejecting drafts only moves a length."""
from __future__ import annotations

import torch


class StaticKVCache:
    """Keys and values for ``num_layers`` layers as [num_layers, B, Hkv, max_len, D] buffers.

    Positions at or beyond a sequence's length hold stale values that attention never reads: a later write at
    the same position overwrites them. Nothing is copied or reallocated after construction.
    """

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        if max_len < 1:
            raise ValueError(f"max_len={max_len} must be >= 1")
        shape = (num_layers, batch, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.int64, device=device)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[index], self.v[index]

    def reset(self) -> None:
        self.lengths.zero_()
