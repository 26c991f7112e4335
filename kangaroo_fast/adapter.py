"""The Kangaroo adapter: RMSNorm -> multi-head self-attention with RoPE -> residual -> RMSNorm.

It reads the hidden states after the first ``exit_layer`` decoder layers and, through the base model's LM head,
predicts the full model's next token. The checkpoint format is the official Kangaroo one: ``config.json`` plus
``model.safetensors`` (or ``pytorch_model.bin``) with the keys ``layers.0.input_layernorm.weight``,
``layers.0.self_attn.{q,k,v,o}_proj.weight`` and ``norm.weight``. kangaroo_fast adds two optional things beside
it: a ``kangaroo`` section in config.json (exit layer, threshold, draft steps) and ``draft_vocab.safetensors``, the
token ids the draft head scores (a pruned draft vocabulary; verification always scores the full vocabulary).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import ModelConfig

WEIGHT_KEYS = (
    "layers.0.input_layernorm.weight",
    "layers.0.self_attn.q_proj.weight",
    "layers.0.self_attn.k_proj.weight",
    "layers.0.self_attn.v_proj.weight",
    "layers.0.self_attn.o_proj.weight",
    "norm.weight",
)


@dataclass
class AdapterConfig:
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    exit_layer: int = 2
    threshold: float = 0.6
    max_draft_steps: int = 6
    lookup: int = 0  # context lookup's longest n-gram (0: off, as the official checkpoints have none)
    extra: dict = field(default_factory=dict)

    @classmethod
    def for_model(cls, config: ModelConfig, **settings) -> "AdapterConfig":
        return cls(hidden_size=config.hidden_size, num_attention_heads=config.num_heads,
                   num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
                   vocab_size=config.vocab_size, rms_norm_eps=config.rms_norm_eps, **settings)

    def to_json(self) -> dict:
        """LlamaConfig-style keys (as the official checkpoints have) plus a ``kangaroo`` section."""
        return {"architectures": ["KangarooAdapter"], "model_type": "llama", "num_hidden_layers": 1,
                "hidden_size": self.hidden_size, "num_attention_heads": self.num_attention_heads,
                "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
                "vocab_size": self.vocab_size, "rms_norm_eps": self.rms_norm_eps,
                "kangaroo": {"exit_layer": self.exit_layer, "threshold": self.threshold,
                             "max_draft_steps": self.max_draft_steps, "lookup": self.lookup, **self.extra}}

    @classmethod
    def from_json(cls, data: dict) -> "AdapterConfig":
        try:
            heads = data["num_attention_heads"]
            settings = dict(data.get("kangaroo", {}))
            known = {k: settings.pop(k) for k in ("exit_layer", "threshold", "max_draft_steps", "lookup")
                     if k in settings}
            return cls(hidden_size=data["hidden_size"], num_attention_heads=heads,
                       num_key_value_heads=data.get("num_key_value_heads") or heads,
                       head_dim=data.get("head_dim") or data["hidden_size"] // heads,
                       vocab_size=data["vocab_size"], rms_norm_eps=data.get("rms_norm_eps", 1e-6),
                       extra=settings, **known)
        except KeyError as err:
            raise ValueError(f"adapter config.json lacks the key {err.args[0]!r}") from None

    def check_matches(self, config: ModelConfig) -> None:
        """Raise a clear error when this adapter was made for another base model."""
        pairs = [("hidden_size", self.hidden_size, config.hidden_size),
                 ("num_attention_heads", self.num_attention_heads, config.num_heads),
                 ("num_key_value_heads", self.num_key_value_heads, config.num_kv_heads),
                 ("head_dim", self.head_dim, config.head_dim),
                 ("vocab_size", self.vocab_size, config.vocab_size)]
        for name, mine, theirs in pairs:
            if mine != theirs:
                raise ValueError(f"adapter does not fit the base model: adapter {name}={mine}, model {name}={theirs}")
        if not 1 <= self.exit_layer <= config.num_layers - 1:
            raise ValueError(f"adapter exit_layer={self.exit_layer} is outside 1..{config.num_layers - 1}")


def adapter_block(ops, hidden: torch.Tensor, input_norm: torch.Tensor, w_qkv: torch.Tensor, w_o: torch.Tensor,
                  eps: float, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  start, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """The adapter's maths before its final norm, once for every caller: hidden [B, T, H] (layer-l states at
    positions start..start+T-1) -> hidden + o(attention(rope(qkv(rms_norm(hidden))))), writing the new keys/values
    into the caches. ``ops`` is a backend (the engine's, or the reference for training); ``cos``/``sin`` are the
    whole [S, D] tables in the activation dtype; ``start`` an int or per-sequence [B] tensor, as the ops take it."""
    q = ops.qkv_rope_cache_write(hidden, input_norm, eps, w_qkv, None, cos, sin, k_cache, v_cache, start, num_heads,
                                 num_kv_heads)
    return ops.linear_residual(ops.attention(q, k_cache, v_cache, start), w_o, hidden)


class Adapter(nn.Module):
    """The adapter as a trainable module. ``forward`` runs it over whole sequences (training, prefill checks);
    the engine runs the same ``adapter_block`` step by step through its backend."""

    def __init__(self, config: AdapterConfig, draft_vocab: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        h, d = config.hidden_size, config.head_dim
        self.input_norm = nn.Parameter(torch.ones(h))
        self.q_proj = nn.Linear(h, config.num_attention_heads * d, bias=False)
        self.k_proj = nn.Linear(h, config.num_key_value_heads * d, bias=False)
        self.v_proj = nn.Linear(h, config.num_key_value_heads * d, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * d, h, bias=False)
        self.norm = nn.Parameter(torch.ones(h))
        if draft_vocab is not None:
            draft_vocab = torch.as_tensor(draft_vocab, dtype=torch.int64)
            if draft_vocab.ndim != 1 or draft_vocab.numel() == 0:
                raise ValueError("draft_vocab must be a non-empty 1-D tensor of token ids")
            if int(draft_vocab.min()) < 0 or int(draft_vocab.max()) >= config.vocab_size:
                raise ValueError(f"draft_vocab holds ids outside 0..{config.vocab_size - 1}")
        self.register_buffer("draft_vocab", draft_vocab, persistent=False)

    # ---- the maths -------------------------------------------------------------------------------------------
    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, H] (layer ``exit_layer`` states at positions 0..T-1), cos/sin [T, D] -> normed [B, T, H].

        The same reference ops the engine uses, over a scratch cache the length of the sequence."""
        from .backend.torch_ref import TorchBackend as ops

        c = self.config
        bsz, t, _ = hidden.shape
        k_cache = hidden.new_zeros(bsz, c.num_key_value_heads, t, c.head_dim)
        v_cache = torch.zeros_like(k_cache)
        out = adapter_block(ops, hidden, self.input_norm, self.qkv_weight(), self.o_proj.weight, c.rms_norm_eps,
                            cos.to(hidden.dtype), sin.to(hidden.dtype), k_cache, v_cache, 0,
                            c.num_attention_heads, c.num_key_value_heads)
        return ops.rms_norm(out, self.norm, c.rms_norm_eps)

    def qkv_weight(self) -> torch.Tensor:
        """q, k and v projections stacked as one [(Hq + 2 Hkv) D, H] matrix, the engine's layout."""
        return torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight], dim=0)

    def head_weight(self, lm_head: torch.Tensor) -> torch.Tensor:
        """The draft head: the LM head's rows of the draft vocabulary (all rows without one)."""
        return lm_head if self.draft_vocab is None else lm_head[self.draft_vocab.to(lm_head.device)]

    # ---- the official checkpoint format ----------------------------------------------------------------------
    def official_state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(WEIGHT_KEYS, (self.input_norm, self.q_proj.weight, self.k_proj.weight, self.v_proj.weight,
                                      self.o_proj.weight, self.norm)))

    def save(self, path: str | Path) -> Path:
        """Write config.json, model.safetensors and (with a draft vocabulary) draft_vocab.safetensors."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.official_state_dict().items()}
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        if self.draft_vocab is not None:
            save_file({"draft_vocab": self.draft_vocab.cpu().contiguous()}, str(path / "draft_vocab.safetensors"))
        (path / "config.json").write_text(json.dumps(self.config.to_json(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, model_config: ModelConfig | None = None) -> "Adapter":
        """Load an official-format adapter directory; with ``model_config``, check it fits that base model."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"adapter directory {str(path)!r} has no config.json")
        config = AdapterConfig.from_json(json.loads((path / "config.json").read_text()))
        if model_config is not None:
            config.check_matches(model_config)
        if (path / "model.safetensors").is_file():
            from safetensors.torch import load_file
            state = load_file(str(path / "model.safetensors"))
        elif (path / "pytorch_model.bin").is_file():
            state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        else:
            raise FileNotFoundError(f"adapter directory {str(path)!r} has neither model.safetensors "
                                    "nor pytorch_model.bin")
        missing = [k for k in WEIGHT_KEYS if k not in state]
        if missing:
            raise ValueError(f"adapter checkpoint {str(path)!r} lacks {', '.join(missing)}")
        draft_vocab = None
        if (path / "draft_vocab.safetensors").is_file():
            from safetensors.torch import load_file
            vocab_file = load_file(str(path / "draft_vocab.safetensors"))
            if "draft_vocab" not in vocab_file:
                raise ValueError(f"{str(path / 'draft_vocab.safetensors')!r} lacks the tensor 'draft_vocab'")
            draft_vocab = vocab_file["draft_vocab"]
        adapter = cls(config, draft_vocab)
        with torch.no_grad():
            for key, param in adapter.official_state_dict().items():
                if tuple(state[key].shape) != tuple(param.shape):
                    raise ValueError(f"adapter tensor {key} has shape {tuple(state[key].shape)}, "
                                     f"the config implies {tuple(param.shape)}")
                param.copy_(state[key])
        return adapter

