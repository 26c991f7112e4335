"""Run a training recipe end to end: data -> teacher features -> distillation -> simulated acceptance -> save.

Every stage's product is cached in a work directory, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path

import torch.distributed as dist

from ..models import cache_dir, load_hf, model_eos_ids, pack_model, resolve_dtype
from .data import chat_ids, document_chunks, frequent_tokens, generate_answers, teacher_features
from .distill import Recipe, _is_main, draft_predictions, init_adapter, simulate_rounds, train_adapter

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DRAFT_STEPS = (4, 6, 8)


def build_corpus(packed, tokenizer, recipe: Recipe, eos: set[int], work_dir: Path, progress: bool) -> dict:
    """{'sequences': [[ids]], 'starts': [answer start or -1 for documentation chunks]} (cached).

    Stage 1 answers ``recipe.n_instructions`` written instructions; stage 2 answers ``recipe.n_bootstrap``
    instructions built on the stage-1 answers (summaries, questions over them as context, follow-ups and
    translations of their sentences). Each stage is cached on its own, so an interrupted run resumes."""
    from .instructions import bootstrap_instructions, local_documentation_texts, training_instructions

    path = work_dir / "corpus.json"
    if path.exists():
        return json.loads(path.read_text())
    work_dir.mkdir(parents=True, exist_ok=True)
    instructions = training_instructions(recipe.n_instructions, seed=recipe.instruction_seed)
    stage1 = _answered(packed, tokenizer, instructions, recipe, eos, work_dir / "corpus-stage1.json", progress)
    sequences, starts = list(stage1["sequences"]), list(stage1["starts"])
    if recipe.n_bootstrap:
        answers = [tokenizer.decode(seq[start:], skip_special_tokens=True)
                   for seq, start in zip(stage1["sequences"], stage1["starts"])]
        second = bootstrap_instructions(instructions, answers, recipe.n_bootstrap, seed=recipe.instruction_seed)
        stage2 = _answered(packed, tokenizer, second, recipe, eos, work_dir / "corpus-stage2.json", progress)
        sequences += stage2["sequences"]
        starts += stage2["starts"]
    docs = document_chunks(tokenizer, local_documentation_texts(recipe.doc_chars, seed=recipe.seed),
                           recipe.doc_chunk_tokens) if recipe.doc_chars else []
    corpus = {"sequences": sequences + docs, "starts": starts + [-1] * len(docs)}
    path.write_text(json.dumps(corpus))
    return corpus


def _answered(packed, tokenizer, instructions: list[str], recipe: Recipe, eos: set[int], path: Path,
              progress: bool) -> dict:
    """The base model's greedy answers to ``instructions`` as {'sequences', 'starts'}, cached at ``path``."""
    if path.exists():
        stage = json.loads(path.read_text())
        if len(stage["sequences"]) == len(instructions):
            return stage
    answers = generate_answers(packed, tokenizer, instructions, recipe.max_new_tokens, recipe.gen_batch_size,
                               eos, progress)
    stage = {"sequences": answers, "starts": [len(chat_ids(tokenizer, text)) for text in instructions]}
    path.write_text(json.dumps(stage))
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
    corpus = build_corpus(packed, tokenizer, recipe, eos, work_dir, progress)
    layers = sorted(set(recipe.candidate_exit_layers) | {recipe.exit_layer})
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
                                resume=resume, progress=progress, log=log, loss_from=corpus["starts"])
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
        output = Path(output)
        chosen.save(output)
        recipe.save(output / "recipe.json")
        (output / "training_report.json").write_text(json.dumps(report, indent=1) + "\n")
    if dist.is_initialized():
        dist.barrier()
    return report
