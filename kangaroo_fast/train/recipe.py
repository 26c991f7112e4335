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
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..models import cache_dir, load_hf, model_eos_ids, pack_model, resolve_dtype
from .data import (REQUEST_SAMPLING, Features, chat_ids, document_chunks, frequent_tokens, generate_answers,
                   sample_requests, teacher_features)
from .distill import (Recipe, TimeLimit, _is_main, differing_field, draft_predictions, init_adapter,
                      simulate_rounds, train_adapter)

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DRAFT_STEPS = (4, 6, 8)
#: Bump when the corpus, the features or the training change in a way the recipe does not show: every cache made
#: by an older version is then rebuilt.
DATA_VERSION = 1
#: The recipe fields each stage's product depends on (beyond the base model and DATA_VERSION).
ANSWER_FIELDS = ("n_instructions", "n_sampled", "instruction_seed", "max_new_tokens", "gen_batch_size", "dtype")
CORPUS_FIELDS = ANSWER_FIELDS + ("n_bootstrap", "doc_chars", "doc_chunk_tokens", "seed")
#: Fields that only choose what is saved or how it decodes, never what a layer's training computes.
DECODING_FIELDS = ("exit_layer", "candidate_exit_layers", "threshold", "max_draft_steps", "lookup")
#: Fields added after caches were first keyed, with their defaults: a key leaves such a field out while it has its
#: default, so what was made before the field existed (the same data) stays valid.
LATER_FIELDS = {"n_sampled": 0}
#: Sequences per cached shard of teacher features (a few minutes of the teacher on a 2-core CPU).
TEACHER_SHARD = 256


class Budget:
    """A run's time limit in minutes (None: none). ``check(where)``, called right after something is saved,
    raises ``TimeLimit`` once the limit has passed; ``seconds`` collects how long each stage took."""

    def __init__(self, minutes: float | None = None):
        if minutes is not None and not minutes > 0:
            raise ValueError(f"time limit {minutes!r} minutes must be > 0")
        self.deadline = None if minutes is None else time.monotonic() + 60 * minutes
        self.seconds: dict[str, float] = {}

    def over(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def check(self, where: str) -> None:
        if self.over():
            raise TimeLimit(where)


def cache_key(recipe: Recipe, fields: tuple[str, ...], base_model: str | None, **extra) -> dict:
    """What a cached product was made from: the named recipe fields, the base model, the data version."""
    values = asdict(recipe)
    return {**{name: values[name] for name in fields
               if not (name in LATER_FIELDS and values[name] == LATER_FIELDS[name])},
            **extra, "base_model": base_model, "data_version": DATA_VERSION}


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
                 base_model: str | None = None, budget: Budget | None = None) -> dict:
    """{'sequences': [[ids]], 'starts': [answer start or -1 for documentation chunks]} (cached).

    Stage 1 answers ``recipe.n_instructions`` written instructions; stage 2 answers ``recipe.n_bootstrap``
    instructions built on the stage-1 answers (summaries, questions over them as context, follow-ups and
    translations of their sentences). Each stage is cached on its own, and its answers batch by batch while it
    runs, so an interrupted run resumes; a cache made from other recipe fields or another ``base_model`` (its
    ``model_fingerprint``) is rebuilt. ``budget``: the run's time limit, and where each stage's seconds go."""
    from .instructions import bootstrap_instructions, local_documentation_texts, training_instructions

    budget = budget or Budget()

    path = work_dir / "corpus.json"
    key = cache_key(recipe, CORPUS_FIELDS, base_model)
    cached = _read_cache(path, key)
    if cached is not None:
        budget.seconds.update(cached.get("seconds", {}))
        return {"sequences": cached["sequences"], "starts": cached["starts"]}
    work_dir.mkdir(parents=True, exist_ok=True)
    instructions = training_instructions(recipe.n_instructions, seed=recipe.instruction_seed)
    if recipe.n_sampled:
        instructions += _sampled_requests(packed, tokenizer, recipe, eos, work_dir / "corpus-requests.json",
                                          progress, base_model, budget)
    stage1 = _answered(packed, tokenizer, instructions, recipe, eos, work_dir / "corpus-stage1.json", progress,
                       cache_key(recipe, ANSWER_FIELDS, base_model), budget, "answers stage 1")
    sequences, starts = list(stage1["sequences"]), list(stage1["starts"])
    if recipe.n_bootstrap:
        answers = [tokenizer.decode(seq[start:], skip_special_tokens=True)
                   for seq, start in zip(stage1["sequences"], stage1["starts"])]
        second = bootstrap_instructions(instructions, answers, recipe.n_bootstrap, seed=recipe.instruction_seed)
        stage2 = _answered(packed, tokenizer, second, recipe, eos, work_dir / "corpus-stage2.json", progress,
                           cache_key(recipe, ANSWER_FIELDS + ("n_bootstrap",), base_model), budget,
                           "answers stage 2")
        sequences += stage2["sequences"]
        starts += stage2["starts"]
    docs = document_chunks(tokenizer, local_documentation_texts(recipe.doc_chars, seed=recipe.seed),
                           recipe.doc_chunk_tokens) if recipe.doc_chars else []
    corpus = {"sequences": sequences + docs, "starts": starts + [-1] * len(docs)}
    _write_cache(path, key, {**corpus, "seconds": dict(budget.seconds)})
    return corpus


def cached_teacher_features(packed, sequences: list[list[int]], layers: list[int], recipe: Recipe, work_dir: Path,
                            key: dict, progress: bool, budget: Budget) -> Features:
    """``teacher_features`` of every sequence, computed and saved in shards of ``TEACHER_SHARD`` sequences
    (``teacher-NNNNN.pt`` under ``key``); a shard saved with the same key and at least these exit layers is read
    back (these layers only), so an interrupted run resumes at the next shard, and a run training fewer layers
    reuses a corpus's features. They take about 1.3 KB per token and exit layer."""
    shards = range(0, len(sequences), TEACHER_SHARD)
    parts: list[Features] = []
    seconds = 0.0
    for n, first in enumerate(tqdm(shards, desc="teacher", unit="shard", disable=not progress)):
        path = work_dir / f"teacher-{n:05d}.pt"
        shard_key = {**key, "shard": n, "shard_size": TEACHER_SHARD}
        saved = torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None
        if (saved is not None and differing_field(saved["key"], shard_key) is None
                and {str(l) for l in layers} <= set(saved["hidden"])):
            parts.append(Features({l: saved["hidden"][str(l)] for l in layers}, saved["top_ids"],
                                  saved["top_probs"]))
            seconds += saved["seconds"]
            continue
        began = time.monotonic()
        part = teacher_features(packed, sequences[first:first + TEACHER_SHARD], layers, recipe.top_k,
                                recipe.teacher_batch_size, progress=False)
        spent = time.monotonic() - began
        seconds += spent
        if _is_main():
            work_dir.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".partial")
            torch.save({"key": shard_key, "hidden": {str(l): h for l, h in part.hidden.items()},
                        "top_ids": part.top_ids, "top_probs": part.top_probs, "seconds": spent}, partial)
            partial.replace(path)
        parts.append(part)
        if n + 1 < len(shards):
            budget.check(f"teacher: {n + 1} of {len(shards)} shards made")
    budget.seconds["teacher"] = round(seconds, 3)
    return Features({l: [h for p in parts for h in p.hidden[l]] for l in layers},
                    [t for p in parts for t in p.top_ids], [t for p in parts for t in p.top_probs])


def _resumable(path: Path, key: dict, budget: Budget, stage: str, empty: dict,
               make: Callable[[dict, Callable[[dict, str | None], None]], dict]) -> dict:
    """A stage's product, cached at ``path`` under ``key``. While ``make(partial, save)`` runs, it calls
    ``save(progress, where)`` after each step: the progress is written to ``<path>.progress.json`` under the same
    key (with the seconds so far) and, where ``where`` is given, the time limit is checked there. A resumed run
    starts ``make`` from that progress (``empty`` when there is none)."""
    cached = _read_cache(path, key)
    if cached is not None:
        budget.seconds[stage] = cached.get("seconds", 0.0)
        return cached
    progress_path = path.with_suffix(".progress.json")
    partial = _read_cache(progress_path, key) or empty
    began = time.monotonic() - partial.get("seconds", 0.0)

    def save(progress: dict, where: str | None) -> None:
        _write_cache(progress_path, key, {**progress, "seconds": time.monotonic() - began})
        if where is not None:
            budget.check(f"{stage}: {where}")

    result = {**make(partial, save), "seconds": round(time.monotonic() - began, 3)}
    _write_cache(path, key, result)
    progress_path.unlink(missing_ok=True)
    budget.seconds[stage] = result["seconds"]
    return result


def _sampled_requests(packed, tokenizer, recipe: Recipe, eos: set[int], path: Path, progress: bool,
                      base_model: str | None, budget: Budget) -> list[str]:
    """``recipe.n_sampled`` requests the model writes itself (``sample_requests``), none overlapping a benchmark
    prompt, cached at ``path``; while sampling, every batch is saved (``<path>.progress.json``) to resume from."""
    from .instructions import bench_filter

    def make(partial: dict, save) -> dict:
        return {"requests": sample_requests(
            packed, tokenizer, recipe.n_sampled, recipe.gen_batch_size, eos, recipe.instruction_seed,
            keep=bench_filter(), progress=progress, done=partial["batches"],
            on_batch=lambda batches: save({"batches": batches}, f"{len(batches)} batches sampled"))}

    key = cache_key(recipe, ("n_sampled", "instruction_seed", "gen_batch_size", "dtype"), base_model,
                    sampling=REQUEST_SAMPLING)
    return _resumable(path, key, budget, "requests", {"batches": []}, make)["requests"]


def _answered(packed, tokenizer, instructions: list[str], recipe: Recipe, eos: set[int], path: Path,
              progress: bool, key: dict, budget: Budget, stage: str) -> dict:
    """The base model's greedy answers to ``instructions`` as {'sequences', 'starts'}, cached at ``path`` under
    ``key``; while it runs, the answers made so far are saved after every batch (``<path>.progress.json``)."""
    def make(partial: dict, save) -> dict:
        done = {int(i): seq for i, seq in partial["done"]}
        if done:
            tqdm.write(f"{path.with_suffix('.progress.json')}: resuming with {len(done)} of {len(instructions)} "
                       "answers made")

        def on_batch(made: dict[int, list[int]]) -> None:
            save({"done": sorted(made.items())}, f"{len(made)} of {len(instructions)} answers made"
                 if len(made) < len(instructions) else None)

        answers = generate_answers(packed, tokenizer, instructions, recipe.max_new_tokens, recipe.gen_batch_size,
                                   eos, progress, done=done, on_batch=on_batch)
        return {"sequences": answers, "starts": [len(chat_ids(tokenizer, text)) for text in instructions]}

    return _resumable(path, key, budget, stage, {"done": []}, make)


def split(corpus: dict, recipe: Recipe) -> tuple[list[int], list[int]]:
    """Held-out answers (for agreement and simulated acceptance); everything else trains."""
    answers = [i for i, s in enumerate(corpus["starts"]) if s >= 0]
    rng = random.Random(recipe.seed)
    heldout = sorted(rng.sample(answers, max(1, int(len(answers) * recipe.heldout_fraction))))
    held = set(heldout)
    return [i for i in range(len(corpus["sequences"])) if i not in held], heldout


def run_recipe(recipe: Recipe, output: Path | None, model=None, work_dir: Path | None = None,
               resume: bool = True, progress: bool = True, time_limit: float | None = None) -> dict:
    """Train the adapter(s) the recipe names; save the one for ``recipe.exit_layer`` to ``output``.

    Returns the report: per candidate exit layer, the training log and the simulated acceptance grid, and the
    seconds each stage took (``stage_seconds``, summed over resumed runs). ``time_limit`` (minutes): past it, the
    run stops at the next save point (a batch of answers, a shard of teacher features, an epoch) and raises
    ``TimeLimit``; the same call then resumes there.
    """
    budget = Budget(time_limit)
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
    corpus = build_corpus(packed, tokenizer, recipe, eos, work_dir, progress, base_model, budget)
    features = cached_teacher_features(packed, corpus["sequences"], layers, recipe, work_dir,
                                       cache_key(recipe, CORPUS_FIELDS + ("top_k",), base_model), progress, budget)
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
              "layers": {}, "stage_seconds": budget.seconds}
    chosen = None
    for layer in layers:
        log: list = []
        adapter = init_adapter(packed.config, packed.final_norm, vocab, layer, recipe.seed, recipe.adapter_mlp)
        key = checkpoint_key(recipe, base_model, layer)
        # named by its key too: recipes differing only in training (an MLP, the epochs) share a work folder's
        # corpus and teacher features, each with its own checkpoint
        name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
        adapter = train_adapter(adapter, features, train_idx, heldout_idx, lm_head, packed.rope_cos,
                                packed.rope_sin, recipe, checkpoint=work_dir / f"checkpoint-l{layer}-{name}.pt",
                                resume=resume, progress=progress, log=log, loss_from=corpus["starts"],
                                checkpoint_key=key, should_stop=budget.over)
        budget.seconds[f"train exit layer {layer}"] = round(sum(entry.get("seconds", 0.0) for entry in log), 3)
        predictions = draft_predictions(adapter, features, heldout_idx, lm_head, packed.rope_cos, packed.rope_sin)
        grid = [simulate_rounds(predictions, starts, t, g) for t in THRESHOLDS for g in DRAFT_STEPS]
        report["layers"][layer] = {"log": log, "simulated": grid}
        if _is_main():
            adapter.save(work_dir / f"adapter-l{layer}-{name}")
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
