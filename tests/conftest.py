"""Shared helpers: tiny random HF Llama-family models, random adapters, and the embedded default model."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

try:  # before any import of distutils: Inductor's C++ builds import setuptools later (it replaces distutils)
    import setuptools  # noqa: F401
except ImportError:  # an image without it (the GPU image) has no such conflict either
    pass

# Without a GPU the Triton kernels run in triton's CPU interpreter; the variable must be set before any kernel is
# decorated, i.e. before a test module imports kangaroo_fast.kernels. The compile checks (tests/
# test_kernel_compile.py) run in a subprocess without it, so one `pytest tests` covers both on CPU, and the real
# compiled kernels on a GPU machine.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Models loaded from a path keep their compiled steps in the user's cache by default; the tests leave that cache
# alone (tests/test_packaged.py names a folder of its own).
os.environ.setdefault("KANGAROO_FAST_STEP_CACHE", "0")

import kangaroo_fast
from kangaroo_fast import Adapter, AdapterConfig, ModelConfig
from kangaroo_fast.backend.inductor import InductorBackend

KINDS = ("llama", "mistral", "qwen2")


class WidenedProducts(InductorBackend):
    """The inductor backend with a bf16 model's products of several rows on float32 copies where this CPU has no
    bf16 products (the path for builds without FBGEMM), whatever FBGEMM offers here."""
    fp16 = False


class HalfProducts(InductorBackend):
    """The inductor backend with a bf16 model's products of several rows on FBGEMM's float16 weights on any CPU."""
    fp16 = True

#: (atol, rtol) of a kernel's or a fast backend's output against the reference run in the same dtype: the one
#: tolerance table. Both sides round to the dtype after their own fp32 accumulation, so they may differ by a few
#: ulps of the dtype.
TOLERANCES = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}

# Shapes per kind: odd vocabularies, non-power-of-two intermediate sizes, GQA (2 or 3 KV heads) and one MHA case
# (mistral: 6 KV heads for 6 query heads). eos/pad/bos are set explicitly.
TINY_SHAPES = {
    "llama": dict(vocab_size=131, hidden_size=48, intermediate_size=100, num_hidden_layers=4,
                  num_attention_heads=6, num_key_value_heads=2, eos_token_id=7, pad_token_id=0, bos_token_id=1),
    "mistral": dict(vocab_size=257, hidden_size=72, intermediate_size=150, num_hidden_layers=5,
                    num_attention_heads=6, num_key_value_heads=6, eos_token_id=11, pad_token_id=3, bos_token_id=1,
                    sliding_window=None),
    "qwen2": dict(vocab_size=97, hidden_size=72, intermediate_size=134, num_hidden_layers=5,
                  num_attention_heads=6, num_key_value_heads=3, eos_token_id=5, pad_token_id=2, bos_token_id=1,
                  use_sliding_window=False),
}


def _config_class(kind: str):
    import transformers

    return {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[kind]


def tiny_model(kind: str, seed: int, **overrides):
    """A random float32 HF causal LM of ``kind`` in eval mode; norms and q/k/v biases are random too."""
    config_cls, model_cls = _config_class(kind)
    settings = dict(TINY_SHAPES[kind], max_position_embeddings=160, initializer_range=0.3, rms_norm_eps=1e-6,
                    tie_word_embeddings=False, rope_theta=10000.0)
    settings.update(overrides)
    rope_theta = settings.pop("rope_theta")
    config = config_cls(**settings)
    config.rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.25 * torch.randn(param.shape, generator=gen))
            elif name.endswith(".bias"):
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))
    model.requires_grad_(False)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    return model


def random_adapter(hf_model, exit_layer: int, seed: int, draft_vocab=None, scale: float = 0.3, **settings) -> Adapter:
    """An Adapter for ``hf_model`` with random non-zero weights (norms around 1)."""
    config = AdapterConfig.for_model(ModelConfig.from_hf(hf_model.config), exit_layer=exit_layer, **settings)
    adapter = Adapter(config, draft_vocab=draft_vocab)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in adapter.named_parameters():
            if name in ("input_norm", "norm"):
                param.copy_(1.0 + 0.25 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(scale * torch.randn(param.shape, generator=gen))
    return adapter.eval()


def early_exit_adapter(hf_model, exit_layer: int, seed: int = 0, **settings) -> Adapter:
    """An adapter that passes layer-l states through unchanged (o_proj = 0) and applies the model's final norm,
    so the draft head is exactly the early-exit LM head at layer ``exit_layer`` (q/k/v stay random)."""
    adapter = random_adapter(hf_model, exit_layer, seed, **settings)
    with torch.no_grad():
        adapter.o_proj.weight.zero_()
        adapter.norm.copy_(hf_model.model.norm.weight.detach().float())
    return adapter


def make_layers_identity(hf_model, first_layer: int) -> None:
    """Zero o_proj and down_proj of layers first_layer..L-1: those layers add nothing to the residual stream."""
    with torch.no_grad():
        for layer in hf_model.model.layers[first_layer:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()


def hf_greedy(hf_model, ids: torch.Tensor, max_new_tokens: int, eos_token_id=None, pad_token_id=None) -> list[int]:
    """HF ``generate(do_sample=False)``'s new tokens for a [1, n] prompt."""
    cfg = hf_model.config
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    pad = cfg.pad_token_id if pad_token_id is None else pad_token_id
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=False, eos_token_id=eos, pad_token_id=pad)
    return out[0, ids.shape[1]:].tolist()


def random_prompt(vocab_size: int, length: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (1, length), generator=gen)


@pytest.fixture
def make_tiny_model():
    return tiny_model


@pytest.fixture(scope="session")
def default_model():
    """(KangarooModel of the embedded SmolLM2-135M in float32, a separate HF reference copy of it)."""
    from transformers import AutoModelForCausalLM

    km = kangaroo_fast.load(dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(kangaroo_fast.models.default_model_dir(), dtype=torch.float32)
    reference.eval().requires_grad_(False)
    return SimpleNamespace(model=km, reference=reference)
