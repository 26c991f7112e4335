"""The engine's weights, prepared once beside the packed model: the adapter's tensors in the engine's dtype, the
widened copies some CPU backends run their products of several rows on, and the frozen modules compiled steps fold
in as constants."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from .adapter import Adapter
from .models import PackedModel


@dataclass
class AdapterWeights:
    """The adapter's tensors in the engine's dtype: its norms and projections, the draft head (the LM head's rows
    of the draft vocabulary) and the draft vocabulary (None: the full one)."""

    input_norm: torch.Tensor
    qkv: torch.Tensor
    o: torch.Tensor
    norm: torch.Tensor
    head: torch.Tensor
    vocab: torch.Tensor | None
    # an adapter with an MLP after its attention (``AdapterConfig.mlp_size``): its norm, stacked gate/up, down
    post_norm: torch.Tensor | None = None
    gate_up: torch.Tensor | None = None
    down: torch.Tensor | None = None

    @classmethod
    @torch.no_grad()
    def of(cls, adapter: Adapter, packed: PackedModel) -> "AdapterWeights":
        """``adapter``'s tensors on the packed model's device and in its dtype (its head from the packed LM head)."""
        device, dtype = packed.device, packed.dtype
        vocab = adapter.draft_vocab
        mlp = adapter.mlp_weights()
        mlp = {} if mlp is None else {name: t.detach().to(device, dtype)
                                      for name, t in zip(("post_norm", "gate_up", "down"), mlp)}
        return cls(input_norm=adapter.input_norm.detach().to(device, dtype),
                   qkv=adapter.qkv_weight().detach().to(device, dtype),
                   o=adapter.o_proj.weight.detach().to(device, dtype),
                   norm=adapter.norm.detach().to(device, dtype),
                   head=adapter.head_weight(packed.lm_head).to(device, dtype).contiguous(),
                   vocab=None if vocab is None else vocab.to(device), **mlp)

    def products_in(self, dtype: torch.dtype) -> "AdapterWeights":
        """A copy whose products' weights (attention, head, MLP) are in ``dtype``; norms and vocabulary shared."""
        mlp = {} if self.gate_up is None else {"gate_up": self.gate_up.to(dtype), "down": self.down.to(dtype)}
        return replace(self, qkv=self.qkv.to(dtype), o=self.o.to(dtype), head=self.head.to(dtype), **mlp)


class FrozenWeights(nn.Module):
    """Tensors as parameters of one module (sharing their storage), so that a compiled step reads them as module
    weights: Inductor's freezing folds only those into the compiled code (and prepacks bf16 products for oneDNN).
    Tensors in lists become ``ModuleList`` entries of the same kind; other values stay plain attributes.
    ``FrozenWeights.of(packed)`` reads like the ``PackedModel`` it wraps."""

    def __init__(self, **values):
        super().__init__()
        for name, value in values.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                value = nn.Parameter(value, requires_grad=False)
            elif isinstance(value, list) and value and hasattr(value[0], "__dataclass_fields__"):
                value = nn.ModuleList(FrozenWeights(**vars(item)) for item in value)
            setattr(self, name, value)

    @classmethod
    def of(cls, packed) -> "FrozenWeights":
        return cls(**vars(packed))

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device


@dataclass
class EngineWeights:
    """What the engine's ops read: the model's weights, the adapter's (None without one) and, where the backend
    widens its products (``product_dtype``: float32 for bf16 on a CPU without bf16 products), copies of both whose
    products' weights are widened (``wide``, else None). They serve the products of more than one row
    (``for_rows``); one-row products, memory-bound, read the narrower weights."""

    model: PackedModel | FrozenWeights
    adapter: AdapterWeights | FrozenWeights | None
    wide: tuple | None

    @classmethod
    def prepare(cls, packed: PackedModel, adapter: Adapter | None, products: torch.dtype,
                frozen: bool) -> "EngineWeights":
        """The weights for an engine whose products run in ``products``; ``frozen``: as ``FrozenWeights`` modules,
        for compiled steps, which fold them in as constants."""
        a = None if adapter is None else AdapterWeights.of(adapter, packed)
        wide = None
        if products != packed.dtype:
            wide = (packed.with_products_in(products), None if a is None else a.products_in(products))
        if not frozen:
            return cls(packed, a, wide)
        if wide is not None:
            wide = (FrozenWeights.of(wide[0]), None if wide[1] is None else FrozenWeights(**vars(wide[1])))
        return cls(FrozenWeights.of(packed), None if a is None else FrozenWeights(**vars(a)), wide)

    def frozen(self) -> list[FrozenWeights]:
        """The frozen modules among these weights (compiled steps' weights), model first."""
        wide = list(self.wide) if self.wide is not None else []
        return [w for w in (self.model, self.adapter, *wide) if isinstance(w, FrozenWeights)]

    def for_rows(self, several_rows: bool) -> tuple:
        """(model weights, adapter weights): the widened copies for products of several rows, else the model's
        own."""
        if self.wide is not None and several_rows:
            return self.wide
        return self.model, self.adapter
