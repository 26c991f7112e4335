"""Adapter training: it learns, it is deterministic, it resumes, DDP works, and the offline acceptance
simulation agrees exactly with the engine."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kangaroo_fast as kf
from kangaroo_fast.train.distill import Recipe, draft_predictions, simulate_rounds, train_adapter

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import synthetic_setup  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    return synthetic_setup()


def _train(setup, recipe, adapter=None, **kwargs):
    adapter = copy.deepcopy(setup.adapter if adapter is None else adapter)
    log = []
    adapter = train_adapter(adapter, setup.features, setup.train_idx, setup.heldout_idx, setup.lm_head, setup.cos,
                            setup.sin, recipe, progress=False, log=log, **kwargs)
    return adapter, log


def _state(adapter):
    return {k: v.detach().clone() for k, v in adapter.official_state_dict().items()}


def test_training_lowers_heldout_loss_and_is_deterministic(setup):
    recipe = Recipe(epochs=4, batch_size=4, lr=3e-3, warmup_steps=2, seed=3)
    first, log = _train(setup, recipe)
    second, _ = _train(setup, recipe)
    assert log[-1]["heldout_loss"] < log[0]["heldout_loss"]
    for key, value in _state(first).items():
        assert torch.equal(value, _state(second)[key]), key
    assert not torch.equal(_state(first)["layers.0.self_attn.o_proj.weight"],
                           _state(setup.adapter)["layers.0.self_attn.o_proj.weight"])


def test_resume_from_checkpoint_equals_uninterrupted_run(setup, tmp_path):
    recipe = Recipe(epochs=3, batch_size=4, lr=3e-3, warmup_steps=2, seed=1)
    straight, _ = _train(setup, recipe)
    checkpoint = tmp_path / "ckpt.pt"
    _train(setup, recipe, checkpoint=checkpoint, stop_after=1)
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1
    resumed, log = _train(setup, recipe, checkpoint=checkpoint, resume=True)
    assert [entry["epoch"] for entry in log] == [1, 2, 3]  # the checkpoint's epoch 1 entry, then the two run now
    for key, value in _state(straight).items():
        torch.testing.assert_close(_state(resumed)[key], value, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mlp_size", [0, 24])
def test_simulated_acceptance_equals_engine(setup, mlp_size):
    """The engine drafts what training's Adapter.forward predicts, the paper's adapter and one with an MLP."""
    from kangaroo_fast.train.distill import init_adapter

    recipe = Recipe(epochs=3, batch_size=4, lr=3e-3, warmup_steps=2)
    start = setup.adapter if not mlp_size else init_adapter(
        setup.packed.config, setup.packed.final_norm, setup.adapter.draft_vocab, 2, seed=0, mlp_size=mlp_size)
    adapter, _ = _train(setup, recipe, adapter=start)
    if mlp_size:
        assert adapter.down_proj.weight.abs().sum() > 0  # trained away from its identity start
    predictions = draft_predictions(adapter, setup.features, setup.heldout_idx, setup.lm_head, setup.cos, setup.sin)
    model = kf.KangarooModel(setup.hf, None, adapter)
    for threshold, steps in [(0.0, 6), (0.3, 3), (1.0, 4)]:
        simulated = simulate_rounds(predictions, [setup.prompt_len] * len(setup.heldout_idx), threshold, steps)
        tokens = rounds = drafts = 0
        for i in setup.heldout_idx:
            prompt = setup.sequences[i][:setup.prompt_len]
            out = model.generate(prompt, max_new_tokens=setup.new_tokens, threshold=threshold, max_draft_steps=steps,
                                 eos_token_id=[])
            assert out.tokens == setup.sequences[i][setup.prompt_len:]
            tokens += out.stats.new_tokens - 1
            rounds += out.stats.rounds
            drafts += out.stats.draft_steps
        assert simulated["mean_accepted"] == pytest.approx(tokens / rounds, abs=1e-12)
        if threshold in (0.0, 1.0):
            # past a rejected draft the engine's confidences follow the wrong token, the simulation's the right
            # one, so draft counts agree exactly only where the threshold decides nothing
            assert simulated["drafts_per_round"] == pytest.approx(drafts / rounds, abs=1e-12)


def test_ddp_two_cpu_processes_train_identical_replicas(tmp_path):
    out = tmp_path / "state"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(Path(__file__).parent / "ddp_worker.py"), str(out)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = torch.load(f"{out}.rank0", weights_only=True)
    rank1 = torch.load(f"{out}.rank1", weights_only=True)
    initial = _state(synthetic_setup().adapter)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert not torch.equal(rank0["layers.0.self_attn.o_proj.weight"], initial["layers.0.self_attn.o_proj.weight"])


def test_corpus_second_stage_answers_prompts_built_on_the_first(default_model, tmp_path):
    """build_corpus: stage 1 answers written instructions, stage 2 answers instructions quoting those answers;
    each stage is cached, and the finished corpus is read back as it was."""
    from kangaroo_fast.train.recipe import build_corpus

    km = default_model.model
    recipe = Recipe(n_instructions=4, n_bootstrap=3, max_new_tokens=64, doc_chars=0, gen_batch_size=4)
    corpus = build_corpus(km.packed, km.tokenizer, recipe, set(km.eos_ids()), tmp_path, progress=False)
    assert len(corpus["sequences"]) == len(corpus["starts"]) == 7
    assert all(0 < start < len(seq) for seq, start in zip(corpus["sequences"], corpus["starts"]))
    first = [km.tokenizer.decode(seq[start:], skip_special_tokens=True)
             for seq, start in zip(corpus["sequences"][:4], corpus["starts"][:4])]
    second_prompts = [km.tokenizer.decode(seq[:start]) for seq, start in zip(corpus["sequences"][4:],
                                                                             corpus["starts"][4:])]
    # every second-stage prompt quotes a first-stage answer (a passage or one of its sentences)
    assert all(any(answer.strip()[:30] in prompt or any(s in prompt for s in answer.split(". ")[1:] if len(s) > 40)
                   for answer in first) for prompt in second_prompts)
    assert {p.name for p in tmp_path.iterdir()} == {"corpus.json", "corpus-stage1.json", "corpus-stage2.json"}
    assert build_corpus(None, None, recipe, set(), tmp_path, progress=False) == corpus  # from the cache


def test_corpus_stage_resumes_from_its_saved_batches(default_model, tmp_path):
    """An interrupted answer stage leaves its batches in corpus-stage1.progress.json (under the stage's key): the
    next run keeps them, answers only the rest, and removes the progress file once the stage is written; progress
    saved under another recipe's key is not used."""
    from kangaroo_fast.train.recipe import ANSWER_FIELDS, build_corpus, cache_key

    km = default_model.model
    recipe = Recipe(n_instructions=3, max_new_tokens=5, doc_chars=0, gen_batch_size=2)
    progress = tmp_path / "corpus-stage1.progress.json"
    marker = [[7, 7, 7], [8, 8, 8]]  # stand-ins no decoder makes: seen again only if they were reused
    key = cache_key(recipe, ANSWER_FIELDS, None)
    progress.write_text(json.dumps({"key": key, "done": [[0, marker[0]], [1, marker[1]]]}))
    corpus = build_corpus(km.packed, km.tokenizer, recipe, set(km.eos_ids()), tmp_path, progress=False)
    reused = [i for i, seq in enumerate(corpus["sequences"]) if seq in marker]
    assert len(reused) >= 1 and not progress.exists()  # one batch of 2 (sorted by prompt length) held a marker
    assert all(len(seq) > start for i, seq in enumerate(corpus["sequences"]) if i not in reused
               for start in [corpus["starts"][i]])

    other = tmp_path / "other"
    other.mkdir()
    stale = {**key, "max_new_tokens": 6}
    (other / "corpus-stage1.progress.json").write_text(json.dumps({"key": stale, "done": [[0, marker[0]]]}))
    fresh = build_corpus(km.packed, km.tokenizer, recipe, set(km.eos_ids()), other, progress=False)
    assert not any(seq in marker for seq in fresh["sequences"])


def _weights(path: Path) -> bytes:
    return (path / "model.safetensors").read_bytes()


def test_rerun_with_a_changed_recipe_reuses_nothing_it_made(tmp_path):
    """The same work folder, a changed recipe: a changed training field retrains (the checkpoint of the old
    recipe is not resumed), a changed corpus field rebuilds the corpus; the unchanged corpus is reused."""
    from kangaroo_fast.train.recipe import run_recipe

    work = tmp_path / "work"
    recipe = Recipe(n_instructions=2, max_new_tokens=4, doc_chars=0, draft_vocab_size=64, top_k=8, epochs=1,
                    batch_size=2, warmup_steps=1, heldout_fraction=0.5, gen_batch_size=4, teacher_batch_size=4,
                    dtype="float32")
    run_recipe(recipe, tmp_path / "first", work_dir=work, progress=False)
    corpus_written = (work / "corpus.json").stat().st_mtime_ns

    changed_lr = Recipe(**{**vars(recipe), "lr": 3e-2})
    run_recipe(changed_lr, tmp_path / "second", work_dir=work, progress=False)
    run_recipe(changed_lr, tmp_path / "fresh", work_dir=tmp_path / "fresh-work", progress=False)
    assert (work / "corpus.json").stat().st_mtime_ns == corpus_written
    assert _weights(tmp_path / "second") != _weights(tmp_path / "first")
    assert _weights(tmp_path / "second") == _weights(tmp_path / "fresh")
    assert Recipe.load(tmp_path / "second" / "recipe.json") == changed_lr

    more = Recipe(**{**vars(changed_lr), "n_instructions": 3})
    report = run_recipe(more, tmp_path / "third", work_dir=work, progress=False)
    assert report["sequences"] == 3
    assert json.loads((work / "corpus.json").read_text())["key"]["n_instructions"] == 3


def test_time_limit_stops_at_save_points_and_resumes(tmp_path, monkeypatch):
    """With a time limit already spent, run_recipe stops at each kind of save point in turn (a batch of answers, a
    shard of teacher features, an epoch), never after a stage's last piece; rerun each time, it ends with the
    adapter and report of an uninterrupted run, the earlier epochs' log and every stage's seconds included."""
    from kangaroo_fast.train import recipe as recipes
    from kangaroo_fast.train.distill import TimeLimit

    monkeypatch.setattr(recipes, "TEACHER_SHARD", 1)
    recipe = Recipe(n_instructions=2, max_new_tokens=4, doc_chars=0, draft_vocab_size=64, top_k=8, epochs=2,
                    batch_size=2, warmup_steps=1, heldout_fraction=0.5, gen_batch_size=1, teacher_batch_size=4,
                    dtype="float32")
    stops = []
    for _ in range(6):
        try:
            report = recipes.run_recipe(recipe, tmp_path / "limited", work_dir=tmp_path / "work", progress=False,
                                        time_limit=1e-9)
            break
        except TimeLimit as stop:
            stops.append(str(stop))
            assert not (tmp_path / "limited").exists()
    assert stops == ["answers stage 1: 1 of 2 answers made", "teacher: 1 of 2 shards made",
                     "exit layer 2: 1 of 2 epochs trained"]
    whole = recipes.run_recipe(recipe, tmp_path / "whole", work_dir=tmp_path / "whole-work", progress=False)
    assert _weights(tmp_path / "limited") == _weights(tmp_path / "whole")
    strip = [{k: v for k, v in entry.items() if k != "seconds"} for entry in whole["layers"][2]["log"]]
    assert [{k: v for k, v in e.items() if k != "seconds"} for e in report["layers"][2]["log"]] == strip
    assert [e["epoch"] for e in strip] == [1, 2]
    assert set(report["stage_seconds"]) == set(whole["stage_seconds"]) == {"answers stage 1", "teacher",
                                                                           "train exit layer 2"}
    assert all(seconds > 0 for seconds in report["stage_seconds"].values())
    assert not list((tmp_path / "work").glob("*.progress.json"))


def test_cli_train_time_limit_exits_75_and_names_where_it_stopped(tmp_path, capsys):
    from kangaroo_fast import cli

    recipe = Recipe(n_instructions=2, max_new_tokens=4, doc_chars=0, gen_batch_size=1, dtype="float32")
    (tmp_path / "recipe.json").write_text(recipe.to_json())
    code = cli.main(["train", "--recipe", str(tmp_path / "recipe.json"), "--output", str(tmp_path / "out"),
                     "--work-dir", str(tmp_path / "work"), "--time-limit", "1e-9"])
    assert code == cli.TIME_LIMIT_EXIT == 75
    assert "answers stage 1: 1 of 2 answers made" in capsys.readouterr().err
    assert (tmp_path / "work" / "corpus-stage1.progress.json").exists() and not (tmp_path / "out").exists()


def test_teacher_shards_resume_and_serve_fewer_layers(setup, tmp_path, monkeypatch):
    """Teacher features are saved in shards: read back they equal what was computed; a run wanting fewer exit
    layers reads the saved shards (no teacher pass); another corpus key, or a layer not saved, computes anew."""
    from kangaroo_fast.train import recipe as recipes

    monkeypatch.setattr(recipes, "TEACHER_SHARD", 10)
    calls = []
    compute = recipes.teacher_features
    monkeypatch.setattr(recipes, "teacher_features", lambda *a, **k: calls.append(len(a[1])) or compute(*a, **k))
    recipe = Recipe(top_k=8, teacher_batch_size=4)

    def features(layers, key):
        return recipes.cached_teacher_features(setup.packed, setup.sequences, layers, recipe, tmp_path, key,
                                               False, recipes.Budget())

    both = features([1, 2], {"corpus": 1})
    assert calls == [10, 10, 4] and len(list(tmp_path.glob("teacher-*.pt"))) == 3
    one = features([2], {"corpus": 1})
    assert calls == [10, 10, 4] and list(one.hidden) == [2]
    for got, made in [(one.hidden[2], both.hidden[2]), (one.top_ids, both.top_ids), (one.top_probs, both.top_probs)]:
        assert len(got) == len(setup.sequences) and all(torch.equal(a, b) for a, b in zip(got, made))
    features([2], {"corpus": 2})
    assert calls == [10, 10, 4] * 2
    features([3], {"corpus": 2})
    assert calls == [10, 10, 4] * 3


def test_recipes_differing_in_training_keep_their_own_checkpoints(tmp_path):
    """Two recipes that differ only in training (here an MLP after the adapter's attention) share one work folder:
    the corpus and teacher features are made once, each keeps its own checkpoint, and a rerun of the first
    resumes its finished checkpoint (same adapter) instead of retraining over the second's."""
    from kangaroo_fast.train.recipe import run_recipe

    work = tmp_path / "work"
    plain = Recipe(n_instructions=2, max_new_tokens=4, doc_chars=0, draft_vocab_size=64, top_k=8, epochs=1,
                   batch_size=2, warmup_steps=1, heldout_fraction=0.5, gen_batch_size=4, teacher_batch_size=4,
                   dtype="float32")
    with_mlp = Recipe(**{**vars(plain), "adapter_mlp": 16})
    run_recipe(plain, tmp_path / "plain", work_dir=work, progress=False)
    corpus_written = (work / "corpus.json").stat().st_mtime_ns
    run_recipe(with_mlp, tmp_path / "mlp", work_dir=work, progress=False)
    assert (work / "corpus.json").stat().st_mtime_ns == corpus_written
    assert len(list(work.glob("checkpoint-l2-*.pt"))) == 2
    assert json.loads((tmp_path / "mlp" / "config.json").read_text())["kangaroo"]["mlp_size"] == 16
    assert "mlp_size" not in json.loads((tmp_path / "plain" / "config.json").read_text())["kangaroo"]
    written = {path: path.stat().st_mtime_ns for path in work.glob("checkpoint-l2-*.pt")}
    report = run_recipe(plain, tmp_path / "again", work_dir=work, progress=False)
    assert {path: path.stat().st_mtime_ns for path in work.glob("checkpoint-l2-*.pt")} == written  # none retrained
    assert [entry["epoch"] for entry in report["layers"][2]["log"]] == [1]  # the log kept in the checkpoint
    assert _weights(tmp_path / "again") == _weights(tmp_path / "plain")


def test_a_recipe_overrides_its_base(tmp_path):
    """``base`` starts from another recipe file (relative to this one, through a chain), the file's own fields
    win, and what loads (and is saved beside an adapter) is the whole recipe with no ``base``."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "root.json").write_text(json.dumps({"epochs": 5, "lr": 0.003, "candidate_exit_layers": [2, 4]}))
    (tmp_path / "sub" / "mid.json").write_text(json.dumps({"base": "../root.json", "epochs": 2, "seed": 7}))
    (tmp_path / "leaf.json").write_text(json.dumps({"base": "sub/mid.json", "exit_layer": 4, "seed": 9}))
    leaf = Recipe.load(tmp_path / "leaf.json")
    assert leaf == Recipe(epochs=2, lr=0.003, candidate_exit_layers=[2, 4], exit_layer=4, seed=9)
    assert Recipe.load(tmp_path / "sub" / "mid.json") == Recipe(epochs=2, lr=0.003, candidate_exit_layers=[2, 4],
                                                                seed=7)
    assert "base" not in json.loads(leaf.to_json())
    leaf.save(tmp_path / "saved.json")
    assert Recipe.load(tmp_path / "saved.json") == leaf


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "bench" / "recipes").glob("*.json")))
def test_every_bench_recipe_loads(path):
    """Each experiment recipe loads, with the fields it lists (over its base's) in force."""
    data = json.loads(path.read_text())
    data.pop("base", None)
    recipe = vars(Recipe.load(path))
    assert {key: recipe[key] for key in data} == data


def test_a_later_field_at_its_default_leaves_cache_keys_as_they_were():
    """n_sampled came after caches were keyed: at 0 no key names it (older corpora and checkpoints stay valid),
    set it is in every key of what it changes."""
    from kangaroo_fast.train.recipe import ANSWER_FIELDS, CORPUS_FIELDS, cache_key, checkpoint_key

    plain, sampled = Recipe(), Recipe(n_sampled=8)
    for key in (cache_key(plain, ANSWER_FIELDS, "m"), cache_key(plain, CORPUS_FIELDS, "m"),
                checkpoint_key(plain, "m", 2)):
        assert "n_sampled" not in key
    for key in (cache_key(sampled, ANSWER_FIELDS, "m"), cache_key(sampled, CORPUS_FIELDS, "m"),
                checkpoint_key(sampled, "m", 2)):
        assert key["n_sampled"] == 8


def test_a_recipe_with_sampled_requests_answers_them_and_caches_them(tmp_path):
    """n_sampled requests join stage 1's instructions: the corpus holds their answers; a rerun reuses the
    cached requests and corpus."""
    from kangaroo_fast.train.data import chat_ids
    from kangaroo_fast.train.recipe import build_corpus

    km = kf.load(dtype=torch.float32)
    recipe = Recipe(n_instructions=1, n_sampled=2, max_new_tokens=4, doc_chars=0, gen_batch_size=2,
                    dtype="float32")
    eos = set(km.eos_ids())
    corpus = build_corpus(km.packed, km.tokenizer, recipe, eos, tmp_path, progress=False)
    requests = json.loads((tmp_path / "corpus-requests.json").read_text())["requests"]
    assert len(requests) == 2 and len(corpus["sequences"]) == 3
    for text, seq, start in zip(requests, corpus["sequences"][1:], corpus["starts"][1:]):
        assert seq[:start] == chat_ids(km.tokenizer, text) and len(seq) > start
    written = (tmp_path / "corpus-requests.json").stat().st_mtime_ns, (tmp_path / "corpus.json").stat().st_mtime_ns
    assert build_corpus(km.packed, km.tokenizer, recipe, eos, tmp_path, progress=False) == corpus
    assert ((tmp_path / "corpus-requests.json").stat().st_mtime_ns,
            (tmp_path / "corpus.json").stat().st_mtime_ns) == written
