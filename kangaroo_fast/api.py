"""The public face: ``load`` a model with its adapter, ``generate`` from it."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .adapter import Adapter
from .backend import resolve_backend
from .config import DecodeSettings, is_int
from .drafting import make_drafter, require_adapter
from .engine import Engine, GenerationStats
from .models import load_hf, model_eos_ids, pack_model
from .step_cache import StepCache

DEFAULT_ADAPTER_DIR = Path(__file__).parent / "adapters" / "smollm2-135m-instruct"
DEFAULT_MAX_CACHE_LEN = 4096


@dataclass
class GenerateOutput:
    tokens: list[int]
    text: str | None
    stats: GenerationStats


class KangarooModel:
    """A packed base model, its tokenizer, an optional adapter, and the engine that decodes with them."""

    def __init__(self, hf_model, tokenizer=None, adapter: Adapter | None = None, backend: str | None = None,
                 max_cache_len: int | None = None, graphs: bool | str | None = None, step_cache=False):
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        self.packed = pack_model(hf_model)
        self.config = self.packed.config
        limit = self.packed.rope_cos.shape[0]
        if max_cache_len is None:
            max_cache_len = min(DEFAULT_MAX_CACHE_LEN, limit)
        if not isinstance(max_cache_len, int) or not 2 <= max_cache_len <= limit:
            raise ValueError(f"max_cache_len={max_cache_len} must lie in 2..{limit} (the model's positions)")
        if adapter is not None:
            adapter.config.check_matches(self.config)
            adapter.config.check_settings(self.config.num_layers, max_cache_len)
            adapter = adapter.to(self.packed.device).eval()
        self.adapter = adapter
        ops = resolve_backend(backend, self.packed.device, self.packed.dtype)
        self.engine = Engine(self.packed, ops, max_cache_len, adapter,
                             adapter.config.max_draft_steps if adapter is not None else 6, graphs=graphs,
                             step_cache=resolve_step_cache(step_cache))

    @property
    def dtype(self) -> torch.dtype:
        return self.packed.dtype

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def default_settings(self) -> dict:
        if self.adapter is None:
            return {"exit_layer": max(1, min(2, self.config.num_layers - 1)), "threshold": 0.6, "max_draft_steps": 6,
                    "lookup": 0}
        c = self.adapter.config
        return {"exit_layer": c.exit_layer, "threshold": c.threshold, "max_draft_steps": c.max_draft_steps,
                "lookup": c.lookup}

    def warm_up(self, batch_sizes: tuple[int, ...] = (1,), sampling: bool = False,
                exit_layer: int | None = None) -> float:
        """Compile the decode steps up front where they are compiled (the inductor backend, the CPU default in
        bfloat16): those of vanilla decoding and of drafting from ``exit_layer`` (the adapter's by default), for
        each batch size, and the sampling steps with ``sampling``. Otherwise each compiles on its first use, up to a
        minute inside a call. Returns the seconds spent (0 where nothing is compiled)."""
        layer = self.default_settings()["exit_layer"] if exit_layer is None else exit_layer
        return self.engine.warm_up(layer if self.adapter is not None else None, tuple(batch_sizes), sampling)

    def eos_ids(self, eos_token_id=None) -> set[int]:
        """The model's own EOS ids, or ``eos_token_id``: one id, a list of ids or an integer tensor of them."""
        if eos_token_id is None:
            ids = sorted(model_eos_ids(self.hf_model))
        elif isinstance(eos_token_id, torch.Tensor) and _is_integer_tensor(eos_token_id):
            ids = eos_token_id.reshape(-1).tolist()
        elif is_int(eos_token_id):
            ids = [eos_token_id]
        elif isinstance(eos_token_id, (list, tuple, set)):
            ids = list(eos_token_id)
        else:
            raise TypeError(f"eos_token_id={eos_token_id!r} must be a token id, a list of token ids or an integer "
                            "tensor")
        for i in ids:
            if not is_int(i) or not 0 <= i < self.config.vocab_size:
                raise ValueError(f"eos_token_id={i!r} is not a token id in 0..{self.config.vocab_size - 1}")
        return set(ids)

    def encode(self, prompt, chat: bool = True) -> torch.Tensor:
        """A string (through the chat template when the tokenizer has one), a list of ids or a [1, n] tensor."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("prompt is empty")
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token ids instead of a string")
            if chat and getattr(self.tokenizer, "chat_template", None):
                ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                         add_generation_prompt=True, tokenize=True,
                                                         return_dict=True)["input_ids"]
            else:
                ids = self.tokenizer(prompt)["input_ids"]
            ids = torch.tensor([list(ids)], dtype=torch.int64)
        elif isinstance(prompt, torch.Tensor):
            if not _is_integer_tensor(prompt):
                raise TypeError(f"input_ids must be an integer tensor, not {prompt.dtype}")
            ids = prompt.to(torch.int64)
            if ids.ndim == 1:
                ids = ids[None]
            if ids.ndim != 2 or ids.shape[0] != 1:
                raise ValueError(f"input_ids must be [n] or [1, n], got shape {tuple(prompt.shape)}")
        elif isinstance(prompt, Sequence) and not isinstance(prompt, (bytes, bytearray)):
            for index, token in enumerate(prompt):
                if not is_int(token):
                    raise TypeError(f"prompt must be a string, a list of token ids or a tensor: item {index} is "
                                    f"{type(token).__name__} {token!r}, not a token id")
            ids = torch.tensor([list(prompt)], dtype=torch.int64)
        else:
            raise TypeError(f"prompt must be a string, a list of token ids or a tensor, not {type(prompt).__name__}"
                            + (" (decode bytes to a string first)" if isinstance(prompt, (bytes, bytearray)) else ""))
        if ids.numel() == 0:
            raise ValueError("prompt is empty")
        bad = (ids < 0) | (ids >= self.config.vocab_size)
        if bool(bad.any()):
            raise ValueError(f"token id {int(ids[bad][0])} is outside the vocabulary 0..{self.config.vocab_size - 1}")
        return ids.to(self.device)

    def generate(self, prompt, max_new_tokens: int = 256, exit_layer: int | None = None,
                 threshold: float | None = None, max_draft_steps: int | None = None, lookup: int | None = None,
                 eos_token_id=None, speculate: bool = True, callback: Callable | None = None, streamer=None,
                 chat: bool = True, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None, generator: torch.Generator | None = None,
                 drafter="kangaroo") -> GenerateOutput | list[GenerateOutput]:
        """Decode one prompt, or a list of prompts as one batch (then a list of outputs, in order).

        ``exit_layer``, ``threshold``, ``max_draft_steps`` and ``lookup`` default to the adapter's settings.
        ``lookup=n`` (n >= 1) also drafts tokens copied from the context (``lookup.py``): where the last n (down to
        2) tokens occurred before, the token that followed them replaces the adapter's proposal; 0 turns it off.

        ``temperature == 0`` (the default) is greedy; above 0 the output is sampled with HF's ``temperature``,
        ``top_k`` (0: off) and ``top_p`` (1: off), losslessly: exactly the base model's sampling distribution.
        ``seed`` or ``generator`` (a ``torch.Generator`` on the model's device) makes sampling reproducible.
        ``callback(new_tokens)`` follows one prompt; with a list it is called as ``callback(index, new_tokens)``.
        ``drafter``: what proposes the drafts (``drafting.py``): "kangaroo" (the adapter, after the context lookup
        when ``lookup`` > 0), "lookup" (the context lookup alone, n = ``lookup`` or 3; needs no adapter), or any
        object with the ``Drafter`` interface.
        """
        if speculate:
            require_adapter(drafter, self.adapter is not None)
        defaults = self.default_settings()
        settings = DecodeSettings(
            exit_layer=defaults["exit_layer"] if exit_layer is None else exit_layer,
            threshold=defaults["threshold"] if threshold is None else threshold,
            max_draft_steps=defaults["max_draft_steps"] if max_draft_steps is None else max_draft_steps,
            lookup=defaults["lookup"] if lookup is None else lookup, max_new_tokens=max_new_tokens,
            temperature=temperature, top_k=top_k, top_p=top_p).validate(self.config.num_layers, speculate,
                                                                        self.engine.max_len)
        generator = self._generator(seed, generator)
        eos = self.eos_ids(eos_token_id)
        drafter = make_drafter(drafter, settings.lookup, self.adapter is not None) if speculate else None
        if _is_batch(prompt):
            if streamer is not None:
                raise ValueError("streamer= follows one prompt; with a list of prompts pass "
                                 "callback=(index, new_tokens) instead")
            ids = [self.encode(p, chat)[0] for p in prompt]
            results = self.engine.generate_batch(ids, settings, eos, speculate=speculate, callback=callback,
                                                 generator=generator, drafter=drafter)
            return [self._output(tokens, stats) for tokens, stats in results]
        ids = self.encode(prompt, chat)

        def on_tokens(new: list[int]) -> None:
            if callback is not None:
                callback(new)
            if streamer is not None:
                streamer.put(torch.tensor(new))

        if streamer is not None:
            streamer.put(ids[0].cpu())
        tokens, stats = self.engine.generate(ids, settings, eos, speculate=speculate, callback=on_tokens,
                                             generator=generator, drafter=drafter)
        if streamer is not None:
            streamer.end()
        return self._output(tokens, stats)

    def _generator(self, seed, generator) -> torch.Generator | None:
        """The sampling generator: ``generator`` as given, or a new one seeded with ``seed``, on the model's device."""
        if seed is not None and generator is not None:
            raise ValueError("pass seed= or generator=, not both")
        if seed is not None:
            if not is_int(seed) or not 0 <= seed < 2 ** 64:
                raise ValueError(f"seed={seed!r} must be an integer in 0..2**64-1")
            return torch.Generator(device=self.device).manual_seed(seed)
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise TypeError(f"generator={generator!r} must be a torch.Generator")
            if generator.device.type != self.device.type:
                raise ValueError(f"generator= is on {generator.device}, the model on {self.device}: "
                                 f"make it with torch.Generator(device={str(self.device)!r})")
        return generator

    def _output(self, tokens: list[int], stats: GenerationStats) -> GenerateOutput:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True) if self.tokenizer is not None else None
        return GenerateOutput(tokens=tokens, text=text, stats=stats)


def _is_batch(prompt) -> bool:
    """A list or tuple of prompts (strings, id lists, tensors), as opposed to one list of token ids."""
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 \
        and all(isinstance(p, (str, list, tuple, torch.Tensor)) for p in prompt)


def _is_integer_tensor(tensor: torch.Tensor) -> bool:
    """Whether the tensor can hold token ids: an integer dtype, not float, complex or bool."""
    return not (tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool)


def _resolve_device(device) -> torch.device | None:
    """None, or ``device`` as a torch.device on which kangaroo_fast can run: the CPU or an available GPU."""
    if device is None:
        return None
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a device: use 'cpu', 'cuda' or 'cuda:N'") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device={str(resolved)!r} is not supported: kangaroo_fast runs on 'cpu' or 'cuda'")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(resolved)!r} was asked for but CUDA is not available")
    return resolved


_DEFAULT: dict = {}


def load(model=None, adapter=None, dtype=None, device=None, backend: str | None = None,
         max_cache_len: int | None = None, graphs: bool | str | None = None, step_cache=None) -> KangarooModel:
    """Load a base model and its adapter.

    model: a local HF directory, a loaded ``PreTrainedModel``, or None for the embedded SmolLM2-135M-Instruct.
    adapter: a directory in the official Kangaroo format, an ``Adapter``, or None (the shipped adapter for the
    embedded model; no adapter otherwise, which allows only ``speculate=False``).
    dtype/device: defaults are the fast dtype of the device (bfloat16 on CUDA, on CPUs with AVX512-BF16 or AMX, and on
    other CPUs where a C++ compiler lets the inductor backend compile; float32 otherwise: ``models.default_dtype``).
    backend: "torch" (the reference), "onednn" (its bf16 products on prepacked oneDNN weights), "inductor" (decode
    steps compiled by ``torch.compile`` into C++ on CPU: a minute or so of compiling per kind of step, once per
    process), "triton" (fused kernels), or None: triton on CUDA when installed; on CPU inductor in bfloat16, and in
    float32 (or without a C++ compiler) onednn where this CPU has oneDNN's bf16 products, else torch (see
    ``backend.default_backend_name``). Without them (AVX2) a bf16 model's KV caches are float32 and, with inductor,
    its products of several rows run on FBGEMM's float16 copies of the weights (2 bytes a weight, exact:
    ``backend/fbgemm.py``); where FBGEMM is missing too, on float32 copies (held up to three times: plain, packed
    by Inductor, packed for the eager calls; about 0.5 GB each for SmolLM2-135M).
    graphs: the decode steps as CUDA graphs; None (default) uses them with the triton backend on CUDA (and compiled
    steps with the inductor backend), False turns them off, True insists on them (see ``Engine``).
    step_cache: where compiled CPU steps are kept for later processes (AOTInductor packages, ``packaged.py``): None
    (default) keeps them in ``<cache dir>/steps`` for a model loaded from a path (or the embedded one) and not for a
    model object (``KANGAROO_FAST_STEP_CACHE=0`` turns that default off); True, False, or a folder.
    """
    hf_model, tokenizer = load_hf(model, dtype, _resolve_device(device))
    if adapter is None and model is None:
        adapter = DEFAULT_ADAPTER_DIR if (DEFAULT_ADAPTER_DIR / "config.json").exists() else None
    if isinstance(adapter, (str, Path)):
        from .config import ModelConfig
        adapter = Adapter.load(adapter, ModelConfig.from_hf(hf_model.config))
    elif adapter is not None and not isinstance(adapter, Adapter):
        raise TypeError(f"adapter must be a path or an Adapter, not {type(adapter).__name__}")
    if step_cache is None:
        step_cache = (model is None or isinstance(model, (str, os.PathLike))) and \
            os.environ.get("KANGAROO_FAST_STEP_CACHE", "1") != "0"
    return KangarooModel(hf_model, tokenizer, adapter, backend=backend, max_cache_len=max_cache_len, graphs=graphs,
                         step_cache=step_cache)


def resolve_step_cache(step_cache) -> StepCache | None:
    """A ``StepCache`` from True (the default folder), a folder, or a ``StepCache``; None for False."""
    if step_cache is False or step_cache is None:
        return None
    if step_cache is True:
        return StepCache()
    if isinstance(step_cache, StepCache):
        return step_cache
    if isinstance(step_cache, (str, os.PathLike)):
        return StepCache(step_cache)
    raise TypeError(f"step_cache must be a bool, a folder or a StepCache, not {type(step_cache).__name__}")


def generate(prompt, model: KangarooModel | None = None, adapter=None,
             **kwargs) -> GenerateOutput | list[GenerateOutput]:
    """Generate from ``prompt`` (or a list of prompts, decoded as one batch, giving a list of outputs) with
    Kangaroo self-speculative decoding: greedy by default, sampled with ``temperature > 0``; lossless either way.

    ``model=None`` uses the embedded default model (loaded once). Keyword arguments are those of
    ``KangarooModel.generate``: max_new_tokens, exit_layer, threshold, max_draft_steps, lookup, eos_token_id, speculate,
    callback, streamer, chat, temperature, top_k, top_p, seed, generator, drafter.
    """
    if model is None:
        key = None if adapter is None else (adapter if isinstance(adapter, Adapter) else str(adapter))
        if key not in _DEFAULT:  # the embedded model, loaded once per adapter asked for
            _DEFAULT[key] = load(adapter=adapter)
        model = _DEFAULT[key]
    elif not isinstance(model, KangarooModel):
        raise TypeError(f"model={model!r} must be a KangarooModel: load it first with kangaroo_fast.load(...)")
    elif adapter is not None:
        raise ValueError("pass adapter= to kangaroo_fast.load(), not with an already loaded model")
    return model.generate(prompt, **kwargs)
