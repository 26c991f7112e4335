"""The Kangaroo adapter: RMSNorm -> multi-head self-attention with RoPE -> residual -> RMSNorm (optionally with
an MLP block after the attention: ``AdapterConfig.mlp_size``, keys ``MLP_KEYS``).

It reads the hidden states after the first ``exit_layer`` decoder layers and, through the base model's LM head,
predicts the full model's next token. The checkpoint format is the official Kangaroo one: ``config.json`` plus
``model.safetensors`` (or ``pytorch_model.bin``) with the keys ``layers.0.input_layernorm.weight``,
``layers.0.self_attn.{q,k,v,o}_proj.weight`` and ``norm.weight``. kangaroo_fast adds two optional things beside
it: a ``kangaroo`` section in config.json (exit layer, threshold, draft steps) and ``draft_vocab.safetensors``, the
token ids the draft head scores (a pruned draft vocabulary; verification always scores the full vocabulary).
"""
from __future__ import annotations

import json
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import DecodeSettings, ModelConfig, is_int, is_number

WEIGHT_KEYS = (
    "layers.0.input_layernorm.weight",
    "layers.0.self_attn.q_proj.weight",
    "layers.0.self_attn.k_proj.weight",
    "layers.0.self_attn.v_proj.weight",
    "layers.0.self_attn.o_proj.weight",
    "norm.weight",
)
#: The optional MLP after the attention (``AdapterConfig.mlp_size`` > 0), in HF Llama's names: a stronger adapter
#: than the paper's (one more residual block, RMSNorm -> SwiGLU), beside the official keys.
MLP_KEYS = (
    "layers.0.post_attention_layernorm.weight",
    "layers.0.mlp.gate_proj.weight",
    "layers.0.mlp.up_proj.weight",
    "layers.0.mlp.down_proj.weight",
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
    mlp_size: int = 0  # the MLP's intermediate size after the attention (0: none, the paper's adapter)
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
                             "max_draft_steps": self.max_draft_steps, "lookup": self.lookup,
                             **({"mlp_size": self.mlp_size} if self.mlp_size else {}), **self.extra}}

    @classmethod
    def from_json(cls, data) -> "AdapterConfig":
        """The config from config.json's parsed content; every value's type and range checked, the key named."""
        if not isinstance(data, dict):
            raise ValueError(f"adapter config.json must hold a JSON object, not {type(data).__name__}")
        for key in ("hidden_size", "num_attention_heads", "vocab_size"):
            if key not in data:
                raise ValueError(f"adapter config.json lacks the key {key!r}")
        for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size"):
            value = data.get(key)
            if value is not None and (not is_int(value) or value < 1):
                raise ValueError(f"adapter config.json: {key}={value!r} must be a positive integer")
        eps = data.get("rms_norm_eps", 1e-6)
        if not is_number(eps) or not 0 < eps < 1:
            raise ValueError(f"adapter config.json: rms_norm_eps={eps!r} must be a number in (0, 1)")
        settings = data.get("kangaroo", {})
        if not isinstance(settings, dict):
            raise ValueError(f"adapter config.json: 'kangaroo' must be a JSON object, not {type(settings).__name__}")
        settings = dict(settings)
        known = {k: settings.pop(k) for k in ("exit_layer", "threshold", "max_draft_steps", "lookup", "mlp_size")
                 if k in settings}
        mlp_size = known.get("mlp_size", 0)
        if not is_int(mlp_size) or mlp_size < 0:
            raise ValueError(f"adapter config.json: kangaroo mlp_size={mlp_size!r} must be an integer >= 0")
        heads = data["num_attention_heads"]
        config = cls(hidden_size=data["hidden_size"], num_attention_heads=heads,
                     num_key_value_heads=data.get("num_key_value_heads") or heads,
                     head_dim=data.get("head_dim") or data["hidden_size"] // heads,
                     vocab_size=data["vocab_size"], rms_norm_eps=eps, extra=settings, **known)
        config.check_settings()
        return config

    def check_settings(self, num_layers: int | None = None, max_cache_len: int | None = None) -> None:
        """The kangaroo settings (exit layer, threshold, draft steps, lookup) as ``generate`` checks them; the
        exit layer against ``num_layers`` and the draft steps against ``max_cache_len`` where given."""
        settings = DecodeSettings(exit_layer=self.exit_layer, threshold=self.threshold,
                                  max_draft_steps=self.max_draft_steps, lookup=self.lookup)
        try:
            settings.validate(num_layers, max_cache_len=max_cache_len)
        except ValueError as err:
            raise ValueError(f"adapter setting {err}") from None

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
                  start, num_heads: int, num_kv_heads: int, end: int | None = None,
                  mlp: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The adapter's maths before its final norm, once for every caller: hidden [B, T, H] (layer-l states at
    positions start..start+T-1) -> hidden + o(attention(rope(qkv(rms_norm(hidden))))), writing the new keys/values
    into the caches. ``ops`` is a backend (the engine's, or the reference for training); ``cos``/``sin`` are the
    whole [S, D] tables in the activation dtype; ``start`` an int or per-sequence [B] tensor and ``end`` the keys'
    bound, as the ops take them. ``mlp``: (post-attention norm, stacked gate/up, down) of an adapter with an MLP,
    which then adds x + mlp(rms_norm(x)) as a decoder layer does."""
    q = ops.qkv_rope_cache_write(hidden, input_norm, eps, w_qkv, None, cos, sin, k_cache, v_cache, start, num_heads,
                                 num_kv_heads)
    x = ops.linear_residual(ops.attention(q, k_cache, v_cache, start, end=end), w_o, hidden)
    if mlp is None:
        return x
    post_norm, w_gate_up, w_down = mlp
    return ops.norm_mlp_residual(x, post_norm, eps, w_gate_up, w_down)


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
        if config.mlp_size:
            self.post_norm = nn.Parameter(torch.ones(h))
            self.gate_proj = nn.Linear(h, config.mlp_size, bias=False)
            self.up_proj = nn.Linear(h, config.mlp_size, bias=False)
            self.down_proj = nn.Linear(config.mlp_size, h, bias=False)
        if draft_vocab is not None:
            draft_vocab = _checked_draft_vocab(torch.as_tensor(draft_vocab), config.vocab_size)
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
                            c.num_attention_heads, c.num_key_value_heads, mlp=self.mlp_weights())
        return ops.rms_norm(out, self.norm, c.rms_norm_eps)

    def mlp_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(post-attention norm, gate and up stacked as one [2I, H] matrix, down) of the MLP; None without one."""
        if not self.config.mlp_size:
            return None
        return self.post_norm, torch.cat([self.gate_proj.weight, self.up_proj.weight], dim=0), self.down_proj.weight

    def qkv_weight(self) -> torch.Tensor:
        """q, k and v projections stacked as one [(Hq + 2 Hkv) D, H] matrix, the engine's layout."""
        return torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight], dim=0)

    def head_weight(self, lm_head: torch.Tensor) -> torch.Tensor:
        """The draft head: the LM head's rows of the draft vocabulary (all rows without one)."""
        return lm_head if self.draft_vocab is None else lm_head[self.draft_vocab.to(lm_head.device)]

    # ---- the official checkpoint format ----------------------------------------------------------------------
    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """The official keys (and, with an MLP, ``MLP_KEYS``) -> this adapter's tensors."""
        state = dict(zip(WEIGHT_KEYS, (self.input_norm, self.q_proj.weight, self.k_proj.weight, self.v_proj.weight,
                                       self.o_proj.weight, self.norm)))
        if self.config.mlp_size:
            state.update(zip(MLP_KEYS, (self.post_norm, self.gate_proj.weight, self.up_proj.weight,
                                        self.down_proj.weight)))
        return state

    def save(self, path: str | Path, extra_files: dict[str, str] | None = None) -> Path:
        """Write config.json, model.safetensors, (with a draft vocabulary) draft_vocab.safetensors and
        ``extra_files`` (file name -> text) as the directory ``path``, replacing what was there.

        Everything is written into a sibling folder first, which then takes the place of ``path``: an interrupted
        save leaves the previous adapter whole (at ``path``, or between the two renames at ``.NAME.old``)."""
        from safetensors.torch import save_file

        path = Path(path)
        partial = path.with_name(f".{path.name}.partial")
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        try:
            tensors = {k: v.detach().cpu().contiguous() for k, v in self.official_state_dict().items()}
            save_file(tensors, str(partial / "model.safetensors"), metadata={"format": "pt"})
            if self.draft_vocab is not None:
                save_file({"draft_vocab": self.draft_vocab.cpu().contiguous()},
                          str(partial / "draft_vocab.safetensors"))
            (partial / "config.json").write_text(json.dumps(self.config.to_json(), indent=2) + "\n")
            for name, text in (extra_files or {}).items():
                (partial / name).write_text(text)
            _replace_directory(partial, path)
        finally:
            if partial.exists():
                shutil.rmtree(partial)
        return path

    @classmethod
    def load(cls, path: str | Path, model_config: ModelConfig | None = None) -> "Adapter":
        """Load an official-format adapter directory; with ``model_config``, check it fits that base model."""
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"adapter directory {str(path)!r} has no config.json")
        try:
            data = json.loads(config_file.read_text())
        except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
            raise ValueError(f"{str(config_file)!r} is not valid JSON: {err}") from None
        try:
            config = AdapterConfig.from_json(data)
            if model_config is not None:
                config.check_matches(model_config)
        except ValueError as err:
            raise ValueError(f"{str(config_file)!r}: {err}") from None
        if (path / "model.safetensors").is_file():
            weights_file = path / "model.safetensors"
        elif (path / "pytorch_model.bin").is_file():
            weights_file = path / "pytorch_model.bin"
        else:
            raise FileNotFoundError(f"adapter directory {str(path)!r} has neither model.safetensors "
                                    "nor pytorch_model.bin")
        state = read_tensors(weights_file)
        missing = [k for k in WEIGHT_KEYS + (MLP_KEYS if config.mlp_size else ()) if k not in state]
        if missing:
            raise ValueError(f"adapter checkpoint {str(path)!r} lacks {', '.join(missing)}")
        draft_vocab = None
        vocab_file = path / "draft_vocab.safetensors"
        if vocab_file.is_file():
            vocab_tensors = read_tensors(vocab_file)
            if "draft_vocab" not in vocab_tensors:
                raise ValueError(f"{str(vocab_file)!r} lacks the tensor 'draft_vocab'")
            draft_vocab = vocab_tensors["draft_vocab"]
        try:
            adapter = cls(config, draft_vocab)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{str(vocab_file)!r}: {err}") from None
        with torch.no_grad():
            for key, param in adapter.official_state_dict().items():
                tensor = state[key]
                if not isinstance(tensor, torch.Tensor) or not tensor.dtype.is_floating_point:
                    raise ValueError(f"{str(weights_file)!r}: {key} must be a floating-point tensor")
                if tuple(tensor.shape) != tuple(param.shape):
                    raise ValueError(f"adapter tensor {key} has shape {tuple(tensor.shape)}, "
                                     f"the config implies {tuple(param.shape)}")
                if not bool(torch.isfinite(tensor).all()):
                    raise ValueError(f"{str(weights_file)!r}: {key} holds NaN or infinite values")
                param.copy_(tensor)
        return adapter


def read_tensors(file: Path) -> dict:
    """The tensors of a safetensors file, or of a PyTorch pickle read with ``weights_only`` (nothing in it runs);
    a truncated, corrupt or refused file is a ValueError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if file.suffix == ".safetensors":
            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except SafetensorError as err:
        raise ValueError(f"{str(file)!r} is not a readable safetensors file: {err}") from None
    except pickle.UnpicklingError:
        raise ValueError(f"{str(file)!r} was refused: it holds more than tensors, and loading it would run its "
                         "code") from None
    except (RuntimeError, EOFError) as err:  # torch.load on a truncated or non-zip file
        raise ValueError(f"{str(file)!r} is not a readable PyTorch checkpoint: {str(err).splitlines()[0]}") \
            from None
    if not isinstance(state, dict):
        raise ValueError(f"{str(file)!r} must hold a dict of named tensors, not {type(state).__name__}")
    return state


def _checked_draft_vocab(draft_vocab: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``draft_vocab`` as int64 after checking it is a 1-D set of distinct integer ids in 0..vocab_size-1."""
    if draft_vocab.ndim != 1 or draft_vocab.numel() == 0:
        raise ValueError("draft_vocab must be a non-empty 1-D tensor of token ids")
    if draft_vocab.dtype.is_floating_point or draft_vocab.dtype.is_complex or draft_vocab.dtype == torch.bool:
        raise TypeError(f"draft_vocab must hold integer token ids, not {draft_vocab.dtype}")
    draft_vocab = draft_vocab.to(torch.int64)
    if int(draft_vocab.min()) < 0 or int(draft_vocab.max()) >= vocab_size:
        raise ValueError(f"draft_vocab holds ids outside 0..{vocab_size - 1}")
    ordered = draft_vocab.sort().values
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if repeated.numel():
        raise ValueError(f"draft_vocab holds the id {int(repeated[0])} more than once")
    return draft_vocab


def _replace_directory(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an existing ``target`` is moved aside first and removed only afterwards."""
    if not target.exists():
        new.rename(target)
        return
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    target.rename(old)
    try:
        new.rename(target)
    except OSError:
        old.rename(target)
        raise
    shutil.rmtree(old)

