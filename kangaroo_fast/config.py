"""One dataclass for the model shape, built once from the HuggingFace config, and one for decode settings."""
from __future__ import annotations

from dataclasses import dataclass

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
#: The smallest sampling temperature: logits / T must stay finite in float32 (|logits| < 3e34 at T = 1e-4).
MIN_TEMPERATURE = 1e-4


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family decoder as the engine sees it."""

    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    qkv_bias: bool
    layer_windows: tuple  # per layer: the sliding-window length, or None for full attention
    max_position_embeddings: int

    @classmethod
    def from_hf(cls, hf_config) -> "ModelConfig":
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r}: kangaroo_fast supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        act = getattr(hf_config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r}: kangaroo_fast supports 'silu'")
        rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "dynamic":
            raise ValueError("rope_type 'dynamic' changes frequencies with the sequence length; it is not supported")
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                     "max_position_embeddings"):
            value = getattr(hf_config, name, None)
            if not is_int(value) or value < 1:
                raise ValueError(f"model config {name}={value!r} must be a positive integer")
        num_heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        window = getattr(hf_config, "sliding_window", None)
        if model_type == "qwen2" and not getattr(hf_config, "use_sliding_window", False):
            window = None
        layer_types = getattr(hf_config, "layer_types", None) or ["sliding_attention"] * hf_config.num_hidden_layers
        windows = tuple(window if kind == "sliding_attention" else None for kind in layer_types)
        return cls(
            model_type=model_type,
            hidden_size=hf_config.hidden_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            intermediate_size=hf_config.intermediate_size,
            vocab_size=hf_config.vocab_size,
            rms_norm_eps=hf_config.rms_norm_eps,
            qkv_bias=model_type == "qwen2" or bool(getattr(hf_config, "attention_bias", False)),
            layer_windows=windows,
            max_position_embeddings=hf_config.max_position_embeddings,
        )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def qkv_size(self) -> int:
        return self.q_size + 2 * self.kv_size


@dataclass(frozen=True)
class DecodeSettings:
    """How one generation drafts and stops. Validated on construction, the offending value named."""

    exit_layer: int
    threshold: float = 0.6
    max_draft_steps: int = 6
    max_new_tokens: int = 256
    lookup: int = 0           # context lookup: the longest n-gram matched (down to 2), 0 off (``lookup.py``)
    temperature: float = 0.0  # HF's meaning; 0 is greedy (do_sample=False)
    top_k: int = 0            # 0 disables top-k
    top_p: float = 1.0        # 1 disables top-p

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self, num_layers: int | None, speculate: bool = True,
                 max_cache_len: int | None = None) -> "DecodeSettings":
        """Raise ValueError naming the first bad value. ``exit_layer`` is checked only when ``speculate`` (without
        drafting it plays no part), against 1..num_layers-1 (only >= 1 where ``num_layers`` is None);
        ``max_draft_steps`` is bounded by ``max_cache_len - 2`` where that is given."""
        if speculate:
            most_layers = float("inf") if num_layers is None else num_layers - 1
            if not is_int(self.exit_layer) or not 1 <= self.exit_layer <= most_layers:
                span = ">= 1" if num_layers is None else f"in 1..{num_layers - 1}"
                raise ValueError(f"exit_layer={self.exit_layer!r} must be an integer {span}")
        if not is_number(self.threshold) or not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold={self.threshold!r} must lie in [0, 1]")
        most_steps = float("inf") if max_cache_len is None else max_cache_len - 2
        if not is_int(self.max_draft_steps) or not 1 <= self.max_draft_steps <= most_steps:
            bound = "" if max_cache_len is None else f" and <= {most_steps} (the cache length {max_cache_len} - 2)"
            raise ValueError(f"max_draft_steps={self.max_draft_steps!r} must be an integer >= 1{bound}")
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be an integer >= 1")
        if not is_int(self.lookup) or self.lookup < 0:
            raise ValueError(f"lookup={self.lookup!r} must be an integer >= 0 (0 turns the context lookup off)")
        t, k, p = self.temperature, self.top_k, self.top_p
        if not is_number(t) or not (t == 0 or MIN_TEMPERATURE <= t < float("inf")):
            raise ValueError(f"temperature={t!r} must be a finite number >= 0: 0 (greedy) or at least "
                             f"{MIN_TEMPERATURE} (smaller ones overflow the scaled logits)")
        if not is_int(k) or k < 0:
            raise ValueError(f"top_k={k!r} must be an integer >= 0 (0 disables top-k)")
        if not is_number(p) or not 0.0 < p <= 1.0:
            raise ValueError(f"top_p={p!r} must lie in (0, 1] (1 disables top-p)")
        return self


def is_int(value) -> bool:
    """An int that is not a bool (True is an int to Python, never a count or a layer here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
