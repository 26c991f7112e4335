"""Run a training recipe end to end: data -> teacher features -> distillation -> simulated acceptance -> save.

Every stage's product is cached in a work directory, so an interrupted run resumes where it stopped. Each cache
(the corpus stages, the corpus, the per-layer checkpoints) carries a key: the recipe fields that produced it, the
base model's fingerprint and ``DATA_VERSION``. A cache whose key differs from the run's is never reused: derived
data is rebuilt and training starts from scratch, with a note naming the first differing field.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..models import cache_dir, load_hf, model_eos_ids, pack_model, resolve_dtype
from .data import chat_ids, document_chunks, frequent_tokens, generate_answers, teacher_features
from .distill import (Recipe, _is_main, differing_field, draft_predictions, init_adapter, simulate_rounds,
                      train_adapter)

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DRAFT_STEPS = (4, 6, 8)
#: Bump when the corpus, the features or the training change in a way the recipe does not show: every cache made
#: by an older version is then rebuilt.
DATA_VERSION = 1
#: The recipe fields each stage's product depends on (beyond the base model and DATA_VERSION).
ANSWER_FIELDS = ("n_instructions", "instruction_seed", "max_new_tokens", "gen_batch_size", "dtype")
CORPUS_FIELDS = ANSWER_FIELDS + ("n_bootstrap", "doc_chars", "doc_chunk_tokens", "seed")
#: Fields that only choose what is saved or how it decodes, never what a layer's training computes.
DECODING_FIELDS = ("exit_layer", "candidate_exit_layers", "threshold", "max_draft_steps", "lookup")


def cache_key(recipe: Recipe, fields: tuple[str, ...], base_model: str | None, **extra) -> dict:
    """What a cached product was made from: the named recipe fields, the base model, the data version."""
    values = asdict(recipe)
    return {**{name: values[name] for name in fields}, **extra, "base_model": base_model,
            "data_version": DATA_VERSION}


def checkpoint_key(recipe: Recipe, base_model: str | None, exit_layer: int) -> dict:
    """A layer's training checkpoint depends on every recipe field but the decoding ones."""
    fields = tuple(name for name in asdict(recipe) if name not in DECODING_FIELDS)
    return cache_key(recipe, fields, base_model, layer=exit_layer)


def model_fingerprint(packed) -> str:
    """A short hash of the base model's shape and a strided sample of its weights (embedding, LM head, first and
    last layer), as float32: the same model gives the same fingerprint wherever it is stored."""
    tensors = (packed.embed, packed.lm_head, packed.layers[0].w_qkv, packed.layers[-1].w_down)
    sample = torch.cat([t.detach().flatten()[::max(1, t.numel() // 4096)].float().cpu() for t in tensors])
    digest = hashlib.sha256(repr(packed.config).encode())
    digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def _read_cache(path: Path, key: dict) -> dict | None:
    """The JSON cached at ``path`` when it was made with ``key``; None (rebuild) when absent or made otherwise."""
    if not path.exists():
        return None
    cached = json.loads(path.read_text())
    differing = differing_field(cached.get("key"), key)
    if differing is not None:
        tqdm.write(f"{path}: made with another {differing}; rebuilding it")
        return None
    return cached


def _write_cache(path: Path, key: dict, data: dict) -> None:
    """Write ``data`` with its key beside it, through a temporary file (never half-written)."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps({"key": key, **data}))
    partial.replace(path)


def build_corpus(packed, tokenizer, recipe: Recipe, eos: set[int], work_dir: Path, progress: bool,
                 base_model: str | None = None) -> dict:
    """{'sequences': [[ids]], 'starts': [answer start or -1 for documentation chunks]} (cached).

    Stage 1 answers ``recipe.n_instructions`` written instructions; stage 2 answers ``recipe.n_bootstrap``
    instructions built on the stage-1 answers (summaries, questions over them as context, follow-ups and
    translations of their sentences). Each stage is cached on its own, so an interrupted run resumes; a cache made
    from other recipe fields or another ``base_model`` (its ``model_fingerprint``) is rebuilt."""
    from .instructions import bootstrap_instructions, local_documentation_texts, training_instructions

    path = work_dir / "corpus.json"
    key = cache_key(recipe, CORPUS_FIELDS, base_model)
    cached = _read_cache(path, key)
    if cached is not None:
        return {"sequences": cached["sequences"], "starts": cached["starts"]}
    work_dir.mkdir(parents=True, exist_ok=True)
    instructions = training_instructions(recipe.n_instructions, seed=recipe.instruction_seed)
    stage1 = _answered(packed, tokenizer, instructions, recipe, eos, work_dir / "corpus-stage1.json", progress,
                       cache_key(recipe, ANSWER_FIELDS, base_model))
    sequences, starts = list(stage1["sequences"]), list(stage1["starts"])
    if recipe.n_bootstrap:
        answers = [tokenizer.decode(seq[start:], skip_special_tokens=True)
                   for seq, start in zip(stage1["sequences"], stage1["starts"])]
        second = bootstrap_instructions(instructions, answers, recipe.n_bootstrap, seed=recipe.instruction_seed)
        stage2 = _answered(packed, tokenizer, second, recipe, eos, work_dir / "corpus-stage2.json", progress,
                           cache_key(recipe, ANSWER_FIELDS + ("n_bootstrap",), base_model))
        sequences += stage2["sequences"]
        starts += stage2["starts"]
    docs = document_chunks(tokenizer, local_documentation_texts(recipe.doc_chars, seed=recipe.seed),
                           recipe.doc_chunk_tokens) if recipe.doc_chars else []
    corpus = {"sequences": sequences + docs, "starts": starts + [-1] * len(docs)}
    _write_cache(path, key, corpus)
    return corpus


def _answered(packed, tokenizer, instructions: list[str], recipe: Recipe, eos: set[int], path: Path,
              progress: bool, key: dict) -> dict:
    """The base model's greedy answers to ``instructions`` as {'sequences', 'starts'}, cached at ``path`` under
    ``key``."""
    cached = _read_cache(path, key)
    if cached is not None:
        return cached
    answers = generate_answers(packed, tokenizer, instructions, recipe.max_new_tokens, recipe.gen_batch_size,
                               eos, progress)
    stage = {"sequences": answers, "starts": [len(chat_ids(tokenizer, text)) for text in instructions]}
    _write_cache(path, key, stage)
    return stage


def split(corpus: dict, recipe: Recipe) -> tuple[list[int], list[int]]:
    """Held-out answers (for agreement and simulated acceptance); everything else trains."""
    answers = [i for i, s in enumerate(corpus["starts"]) if s >= 0]
    rng = random.Random(recipe.seed)
    heldout = sorted(rng.sample(answers, max(1, int(len(answers) * recipe.heldout_fraction))))
    held = set(heldout)
    return [i for i in range(len(corpus["sequences"])) if i not in held], heldout


def run_recipe(recipe: Recipe, output: Path | None, model=None, work_dir: Path | None = None,
               resume: bool = True, progress: bool = True) -> dict:
    """Train the adapter(s) the recipe names; save the one for ``recipe.exit_layer`` to ``output``.

    Returns the report: per candidate exit layer, the training log and the simulated acceptance grid.
    """
    dtype = resolve_dtype(recipe.dtype)
    hf_model, tokenizer = load_hf(model, dtype=dtype, device="cpu")
    if tokenizer is None:
        raise ValueError("training needs the model's tokenizer")
    work_dir = Path(work_dir or cache_dir() / "train" / "default")
    eos = model_eos_ids(hf_model)
    packed = pack_model(hf_model)  # in place: hf_model keeps working on the same (now fused) weights
    layers = sorted(set(recipe.candidate_exit_layers) | {recipe.exit_layer})
    for layer in layers:
        if not 1 <= layer <= packed.config.num_layers - 1:
            raise ValueError(f"recipe exit layer {layer} is outside 1..{packed.config.num_layers - 1}")
    base_model = model_fingerprint(packed)
    corpus = build_corpus(packed, tokenizer, recipe, eos, work_dir, progress, base_model)
    features = teacher_features(hf_model, corpus["sequences"], layers, recipe.top_k, recipe.teacher_batch_size,
                                progress)
    train_idx, heldout_idx = split(corpus, recipe)
    vocab = None
    if recipe.draft_vocab_size:
        vocab = frequent_tokens(features.subset(train_idx), recipe.draft_vocab_size, packed.config.vocab_size,
                                eos)
    lm_head = packed.lm_head.float()
    starts = [corpus["starts"][i] for i in heldout_idx]
    report = {"recipe": asdict(recipe), "sequences": len(corpus["sequences"]),
              "train_tokens": sum(len(corpus["sequences"][i]) for i in train_idx),
              "heldout_answers": len(heldout_idx), "draft_vocab_size": None if vocab is None else int(vocab.numel()),
              "layers": {}}
    chosen = None
    for layer in layers:
        log: list = []
        adapter = init_adapter(packed.config, packed.final_norm, vocab, layer, recipe.seed)
        adapter = train_adapter(adapter, features, train_idx, heldout_idx, lm_head, packed.rope_cos,
                                packed.rope_sin, recipe, checkpoint=work_dir / f"checkpoint-l{layer}.pt",
                                resume=resume, progress=progress, log=log, loss_from=corpus["starts"],
                                checkpoint_key=checkpoint_key(recipe, base_model, layer))
        predictions = draft_predictions(adapter, features, heldout_idx, lm_head, packed.rope_cos, packed.rope_sin)
        grid = [simulate_rounds(predictions, starts, t, g) for t in THRESHOLDS for g in DRAFT_STEPS]
        report["layers"][layer] = {"log": log, "simulated": grid}
        if _is_main():
            adapter.save(work_dir / f"adapter-l{layer}")
        if layer == recipe.exit_layer:
            chosen = adapter
    if output is not None and _is_main():
        cfg = chosen.config
        cfg.threshold, cfg.max_draft_steps, cfg.lookup = recipe.threshold, recipe.max_draft_steps, recipe.lookup
        chosen.save(output, extra_files={"recipe.json": recipe.to_json(),
                                         "training_report.json": json.dumps(report, indent=1) + "\n"})
    if dist.is_initialized():
        dist.barrier()
    return report
