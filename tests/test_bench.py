"""kangaroo-fast bench / tune: prompt and questions files, the runner on a tiny random model, results files; the
checkout's bench tooling (bench/report.py: commit, plot, README block; bench/harness.py)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kangaroo_fast as kf
from kangaroo_fast import benchmark, cli
from conftest import random_adapter, tiny_model


def encode_bytes(monkeypatch) -> None:
    """The bench's prompts encoded as bytes (``byte_encoder``), wherever the runs and the command line encode them."""
    monkeypatch.setattr(benchmark, "chat_encoder", lambda model: byte_encoder)
    monkeypatch.setattr(benchmark.runner, "chat_encoder", lambda model: byte_encoder)

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = benchmark.DEFAULT_PROMPTS
TINY_VOCAB = 131  # the tiny llama of conftest


def byte_encoder(messages):
    """A tokenizer stand-in for the tiny model: characters mapped into its vocabulary, 'roles' as ids 2 and 3."""
    ids = []
    for m in messages:
        ids.append(2 if m["role"] == "user" else 3)
        ids.extend(8 + ord(c) % (TINY_VOCAB - 8) for c in m["content"][:24])
    return torch.tensor([ids], dtype=torch.int64)


def byte_decoder(tokens):
    return "".join(chr(97 + t % 26) for t in tokens)


@pytest.fixture(scope="module")
def tiny():
    """The tiny float32 llama with an adapter that always drafts (threshold 0), so drafts are accepted and
    rejected in the same run."""
    hf = tiny_model("llama", 3)
    return kf.KangarooModel(hf, None, random_adapter(hf, 2, 5, threshold=0.0, max_draft_steps=3))


SAMPLES = [benchmark.Sample("c1", "conversation", ["how are you today", "and tomorrow?"]),
           benchmark.Sample("m1", "math", ["two plus two is four"]),
           benchmark.Sample("m2", "math", ["abcabcabcabcabc"])]
NO_COMPILE = [m for m in benchmark.METHODS if m != "hf_compile"]


# ---- questions and prompt files -------------------------------------------------------------------------------------
def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_questions_file_takes_the_first_turn(tmp_path):
    path = write_lines(tmp_path / "question.jsonl", [
        json.dumps({"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Now shorter."]}),
        "",
        json.dumps({"question_id": "q-2", "category": "math_reasoning", "turns": ["What is 7 * 6?"]}),
        json.dumps({"question_id": 3, "turns": ["No category here."]})])
    samples = benchmark.load_questions(path)
    assert [(s.id, s.category, s.turns) for s in samples] == [
        ("81", "writing", ["Write a poem."]), ("q-2", "math_reasoning", ["What is 7 * 6?"]),
        ("3", "questions", ["No category here."])]


@pytest.mark.parametrize("bad_line, message", [
    ('{"question_id": 2, "turns": ["a"]', "not valid JSON"),
    ('[1, 2]', "expected a JSON object, got list"),
    ('{"turns": ["a"]}', "missing 'question_id'"),
    ('{"question_id": true, "turns": ["a"]}', "'question_id' must be an integer or a string"),
    ('{"question_id": 2}', "'turns' must be a non-empty list"),
    ('{"question_id": 2, "turns": []}', "'turns' must be a non-empty list"),
    ('{"question_id": 2, "turns": ["a", 5]}', "turn 1 must be a non-empty string"),
    ('{"question_id": 2, "turns": ["  "]}', "turn 0 must be a non-empty string"),
    ('{"question_id": 2, "category": 7, "turns": ["a"]}', "'category' must be a non-empty string"),
    ('{"question_id": 1, "turns": ["a"]}', "question_id '1' repeats line 1"),
])
def test_malformed_questions_name_the_line(tmp_path, bad_line, message):
    path = write_lines(tmp_path / "question.jsonl", ['{"question_id": 1, "turns": ["fine"]}', "", bad_line])
    with pytest.raises(ValueError) as err:
        benchmark.load_questions(path)
    assert f"{path}:3: " in str(err.value)
    assert message in str(err.value)


def test_empty_and_missing_questions_files(tmp_path):
    with pytest.raises(ValueError, match="no questions"):
        benchmark.load_questions(write_lines(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        benchmark.load_questions(tmp_path / "absent.jsonl")


def test_prompt_set_ships_in_the_package():
    assert PROMPTS == Path(kf.__file__).resolve().parent / "data" / "prompts.jsonl" and PROMPTS.is_file()
    assert not (ROOT / "bench" / "prompts.jsonl").exists()  # one copy of the prompt set
    from kangaroo_fast.train.instructions import BENCH_PATH

    assert BENCH_PATH == PROMPTS


def test_prompts_may_name_a_split(tmp_path):
    path = write_lines(tmp_path / "prompts.jsonl", [
        json.dumps({"id": "a", "category": "qa", "turns": ["one", "two"], "split": "tune"}),
        json.dumps({"id": "b", "category": "qa", "turns": ["three"]})])
    assert [(s.id, s.split) for s in benchmark.load_prompts(path)] == [("a", "tune"), ("b", None)]
    assert [(s.turns, s.split) for s in benchmark.load_prompts(path, all_turns=False)] == [(["one"], "tune"),
                                                                                          (["three"], None)]
    write_lines(path, [json.dumps({"id": "a", "turns": ["one"], "split": ""})])
    with pytest.raises(ValueError, match=f"{path}:1: 'split' must be a non-empty string"):
        benchmark.load_prompts(path)


def test_shipped_prompts_and_per_category():
    samples = benchmark.load_prompts(PROMPTS)
    assert any(len(s.turns) >= 2 for s in samples)
    first = benchmark.load_prompts(PROMPTS, all_turns=False)
    assert [s.turns for s in first] == [s.turns[:1] for s in samples]
    two = benchmark.per_category(samples, 2)
    categories = {s.category for s in samples}
    assert len(categories) == 6
    assert len(two) == 2 * len(categories)
    assert [s.id for s in two if s.category == "math"] == [s.id for s in samples if s.category == "math"][:2]
    assert benchmark.per_category(samples, None) == samples
    with pytest.raises(ValueError, match="per_category=0"):
        benchmark.per_category(samples, 0)


# ---- command-line arguments (all fail before a model is loaded) ------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["bench", "--methods", "vanilla", "kangaroo"], "must include 'hf'"),
    (["bench", "--methods", "hf", "medusa"], "unknown method 'medusa'"),
    (["bench", "--per-category", "0"], "--per-category=0"),
    (["bench", "--max-new-tokens", "0"], "--max-new-tokens=0"),
    (["bench", "--prompt-lookup-tokens", "0"], "--prompt-lookup-tokens=0"),
    (["bench", "--batch-sizes", "2", "0"], "--batch-sizes=0"),
    (["tune", "--held-out", "0"], "--held-out=0"),
    (["tune", "--per-category", "-1"], "--per-category=-1"),
])
def test_bad_arguments_fail_clearly(args, message, capsys, monkeypatch):
    monkeypatch.setattr(kf, "load", lambda *a, **k: pytest.fail("the model must not be loaded"))
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err


def test_malformed_questions_file_fails_in_the_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(kf, "load", lambda *a, **k: pytest.fail("the model must not be loaded"))
    path = write_lines(tmp_path / "q.jsonl", ['{"question_id": 1, "turns": ["a"]}', "{oops"])
    assert cli.main(["bench", "--questions", str(path)]) == 2
    assert f"{path}:2: not valid JSON" in capsys.readouterr().err


# ---- the runner on a tiny model --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_result(tiny):
    return benchmark.run_benchmark(tiny, SAMPLES, NO_COMPILE, max_new_tokens=10, encode=byte_encoder,
                                   decode=byte_decoder)


def test_every_method_matches_hf_in_float32(tiny_result):
    records = tiny_result["records"]
    assert tiny_result["methods"] == NO_COMPILE
    # 3 samples, the first with two turns: 4 prompts per method
    assert len(records) == 4 * len(NO_COMPILE)
    assert {(r["id"], r["turn"]) for r in records} == {("c1", 0), ("c1", 1), ("m1", 0), ("m2", 0)}
    assert all(r["same_as_hf"] and r["first_difference"] is None for r in records)
    overall = tiny_result["summary"]["overall"]
    for method in NO_COMPILE:
        assert overall[method]["same_as_hf"] == overall[method]["samples"] == 4
        assert overall[method]["mismatches"] == []
    assert "MISMATCH" not in benchmark.markdown_table(tiny_result)


def test_second_turn_sees_the_first_answer(tiny_result):
    first, second = (next(r for r in tiny_result["records"] if r["id"] == "c1" and r["turn"] == t and
                          r["method"] == "hf") for t in (0, 1))
    answer = byte_decoder([0] * first["new_tokens"])  # only its length matters for the prompt length
    expected = byte_encoder([{"role": "user", "content": "how are you today"},
                             {"role": "assistant", "content": answer},
                             {"role": "user", "content": "and tomorrow?"}]).shape[1]
    assert second["prompt_tokens"] == expected


def test_summary_statistics(tiny_result):
    summary = tiny_result["summary"]
    assert set(summary) == {"conversation", "math", "overall"}
    for category, per_method in summary.items():
        rows = [r for r in tiny_result["records"] if category in ("overall", r["category"])]
        for method, stats in per_method.items():
            mine = [r for r in rows if r["method"] == method]
            assert stats["new_tokens"] == sum(r["new_tokens"] for r in mine)
            assert stats["tokens_per_s"] == pytest.approx(stats["new_tokens"] / sum(r["seconds"] for r in mine))
            assert stats["speedup_vs_hf"] == pytest.approx(stats["tokens_per_s"] / per_method["hf"]["tokens_per_s"])
        for greedy in ("hf", "vanilla"):
            assert per_method[greedy]["mean_accepted"] == 1.0
        kangaroo = per_method["kangaroo"]
        k_rows = [r for r in rows if r["method"] == "kangaroo"]
        assert kangaroo["mean_accepted"] == pytest.approx(
            sum(r["new_tokens"] - 1 for r in k_rows) / sum(r["rounds"] for r in k_rows))
        assert kangaroo["drafts_per_round"] == pytest.approx(
            sum(r["draft_steps"] for r in k_rows) / sum(r["rounds"] for r in k_rows))
        assert all(0 <= r["lookup_drafts"] <= r["draft_steps"] for r in k_rows)
        assert kangaroo["copied_share"] == pytest.approx(
            sum(r["lookup_drafts"] for r in k_rows) / sum(r["draft_steps"] for r in k_rows))
        assert len(kangaroo["acceptance_rate"]) == 3 and all(0 <= a <= 1 for a in kangaroo["acceptance_rate"])
    # threshold 0: every round that had room drafted max_draft_steps tokens
    assert summary["overall"]["kangaroo"]["drafts_per_round"] > 1.0


def test_paper_drafting_method_copies_nothing(tiny):
    """kangaroo_paper is Kangaroo with the context lookup off: with lookup 2 the default method copies drafts from
    the repetitive prompt, the paper's drafting copies none yet drafts; both equal HF greedy in float32."""
    result = benchmark.run_benchmark(tiny, SAMPLES[2:], ["hf", "kangaroo", "kangaroo_paper"], max_new_tokens=10,
                                     encode=byte_encoder, decode=byte_decoder, settings={"lookup": 2})
    rows = {r["method"]: r for r in result["records"]}
    assert rows["kangaroo"]["lookup_drafts"] > 0
    assert rows["kangaroo_paper"]["lookup_drafts"] == 0 and rows["kangaroo_paper"]["draft_steps"] > 0
    assert all(r["same_as_hf"] for r in rows.values())
    assert "paper drafting" in benchmark.markdown_table(result)


def test_summarise_counts_by_hand():
    def record(method, tokens, seconds, forwards, **extra):
        return {"id": "a", "category": "qa", "turn": 0, "method": method, "new_tokens": tokens, "seconds": seconds,
                "target_forwards": forwards, "rounds": extra.get("rounds"), "draft_steps": extra.get("drafts"),
                "lookup_drafts": extra.get("copied"),
                "drafted_at": extra.get("drafted_at", []), "accepted_at": extra.get("accepted_at", []),
                "same_as_hf": extra.get("same", True), "first_difference": extra.get("diff")}

    records = [record("hf", 9, 3.0, 9), record("vanilla", 9, 2.0, 9),
               record("kangaroo", 9, 1.0, 5, rounds=4, drafts=6, copied=2, drafted_at=[4, 2], accepted_at=[3, 1],
                      same=False, diff=7)]
    s = benchmark.summarise(records, ["hf", "vanilla", "kangaroo"])["qa"]
    assert s["hf"]["tokens_per_s"] == 3.0 and s["vanilla"]["speedup_vs_hf"] == 1.5
    assert s["kangaroo"]["speedup_vs_hf"] == 3.0 and s["kangaroo"]["speedup_vs_vanilla"] == 2.0
    assert s["kangaroo"]["mean_accepted"] == 2.0  # (9 - 1) tokens over 4 forwards after the prefill
    assert s["kangaroo"]["acceptance_rate"] == [0.75, 0.5]
    assert s["kangaroo"]["drafts_per_round"] == 1.5
    assert s["kangaroo"]["copied_share"] == pytest.approx(2 / 6)
    assert s["kangaroo"]["mismatches"] == ["a#0@7"] and s["kangaroo"]["same_as_hf"] == 0


def test_forced_mismatch_is_flagged(tiny, monkeypatch):
    original = benchmark.Methods.vanilla

    def corrupted(self, ids):
        result = original(self, ids)
        result.tokens[2] = (result.tokens[2] + 1) % TINY_VOCAB
        return result

    monkeypatch.setattr(benchmark.Methods, "vanilla", corrupted)
    result = benchmark.run_benchmark(tiny, SAMPLES[1:], ["hf", "vanilla", "kangaroo"], max_new_tokens=6,
                                     encode=byte_encoder)
    vanilla = result["summary"]["overall"]["vanilla"]
    assert vanilla["same_as_hf"] == 0 and vanilla["mismatches"] == ["m1#0@2", "m2#0@2"]
    assert result["summary"]["overall"]["kangaroo"]["mismatches"] == []
    table = benchmark.markdown_table(result)
    assert "| kangaroo_fast vanilla |" in table and "0/2 **MISMATCH**" in table and "m1#0@2" in table


def test_first_difference():
    assert benchmark.runner._first_difference([1, 2, 3], [1, 2, 3]) is None
    assert benchmark.runner._first_difference([1, 5, 3], [1, 2, 3]) == 1
    assert benchmark.runner._first_difference([1, 2], [1, 2, 3]) == 2


def test_compile_failure_is_recorded_not_raised(tiny, monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C compiler here")

    monkeypatch.setattr(torch, "compile", no_compiler)
    result = benchmark.run_benchmark(tiny, SAMPLES[1:2], ["hf", "hf_compile", "vanilla"], max_new_tokens=4,
                                     encode=byte_encoder)
    assert result["methods"] == ["hf", "vanilla"]
    assert result["unavailable"] == {"hf_compile": "RuntimeError: no C compiler here"}
    assert "HF static+compile | not available on this platform: RuntimeError: no C compiler here" in \
        benchmark.markdown_table(result)


def test_runner_rejects_bad_input(tiny):
    with pytest.raises(ValueError, match="no prompts"):
        benchmark.run_benchmark(tiny, [], encode=byte_encoder)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        benchmark.run_benchmark(tiny, SAMPLES, ["hf"], max_new_tokens=0, encode=byte_encoder)
    with pytest.raises(ValueError, match="threshold=1.5"):
        benchmark.run_benchmark(tiny, SAMPLES, ["hf", "kangaroo"], settings={"threshold": 1.5}, encode=byte_encoder)
    with pytest.raises(ValueError, match="exit_layer=9"):
        benchmark.run_benchmark(tiny, SAMPLES, ["hf"], settings={"exit_layer": 9}, encode=byte_encoder)
    with pytest.raises(ValueError, match="prompt_lookup_tokens=0"):
        benchmark.run_benchmark(tiny, SAMPLES, ["hf"], prompt_lookup_tokens=0, encode=byte_encoder)
    bare = kf.KangarooModel(tiny.hf_model, None, None)
    with pytest.raises(ValueError, match="kangaroo method needs a model with an adapter"):
        benchmark.run_benchmark(bare, SAMPLES, ["hf", "kangaroo"], encode=byte_encoder)
    with pytest.raises(ValueError, match="no tokenizer"):
        benchmark.run_benchmark(tiny, SAMPLES, ["hf"])


def test_results_files(tiny_result, tmp_path):
    result = {"model": "tiny-llama", "machine": benchmark.machine_info(), **tiny_result}
    paths = benchmark.write_results(result, tmp_path / "out", "run")
    assert {p.name for p in paths.values()} == {"run.json", "run.md"}  # the plot is bench/report.py's
    data = json.loads(paths["json"].read_text())
    assert data["summary"] == json.loads(json.dumps(tiny_result["summary"]))
    assert data["machine"]["torch"] == torch.__version__ and data["machine"]["kangaroo_fast"] == kf.__version__
    assert "commit" not in data["machine"]  # the library asks no git: bench/report.py adds it
    table = paths["markdown"].read_text()
    for method in NO_COMPILE:
        assert f"| {benchmark.METHOD_LABELS[method]} |" in table
    assert "| method | conversation | math | overall |" in table


def test_cli_bench_quick_writes_results(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(kf, "load", lambda *a, **k: tiny)
    encode_bytes(monkeypatch)
    code = cli.main(["bench", "--quick", "--methods", "hf", "vanilla", "kangaroo", "--max-new-tokens", "5",
                     "--output-dir", str(tmp_path), "--name", "quick"])
    assert code == 0
    data = json.loads((tmp_path / "quick.json").read_text())
    assert data["command"].startswith("kangaroo-fast bench --quick")
    assert data["quick"] is True and data["settings"]["max_new_tokens"] == 5
    assert len({r["id"] for r in data["records"]}) == 6  # one prompt per category
    assert data["split"] == "report" and not any(r["id"].startswith("tune-") for r in data["records"])
    assert all(r["turn"] == 0 for r in data["records"])
    assert (tmp_path / "quick.md").exists() and not (tmp_path / "quick.png").exists()
    assert "| kangaroo_fast Kangaroo |" in capsys.readouterr().out


def test_batch_sizes_axis(tiny):
    samples = SAMPLES + [benchmark.Sample("q1", "qa", ["what is the capital"]),
                         benchmark.Sample("q2", "qa", ["zzzz yyyy"])]
    batch = benchmark.run_batch_sizes(tiny, samples, [4, 2], max_new_tokens=7, encode=byte_encoder)
    assert batch["batch_sizes"] == [1, 2, 4]  # batch 1 added as the reference
    assert [(r["batch_size"], r["method"]) for r in batch["rows"]] == [
        (b, m) for b in (1, 2, 4) for m in ("vanilla", "kangaroo")]
    for r in batch["rows"]:
        assert r["same_as_batch_1"] == len(samples)  # float32: every batched sequence equals its batch-1 output
        assert r["new_tokens"] == len(samples) * 7 and r["tokens_per_s"] > 0
        if r["method"] == "vanilla":
            assert r["speedup_vs_vanilla"] == 1.0
    assert batch["rows"][0]["speedup_vs_vanilla_batch_1"] == 1.0
    table = benchmark.batch_markdown(batch)
    assert table.count("\n| ") == 1 + 6 and "| 4 | kangaroo_fast Kangaroo |" in table
    with pytest.raises(ValueError, match="batch size 0"):
        benchmark.run_batch_sizes(tiny, samples, [0], max_new_tokens=3, encode=byte_encoder)


def test_batch_sizes_run_vllm_methods_as_concurrent_requests(tiny, monkeypatch):
    """The vLLM methods join the batch axis: each group goes to the peer as one call of concurrent requests (a
    stand-in peer here: the greedy tokens, counted calls); rows gain the ratio to vLLM at the same batch size."""
    from kangaroo_fast.benchmark import vllm_peer as peer

    calls = []

    class FakePeer:
        def __init__(self, model, max_new_tokens, settings, ngram_tokens, max_num_seqs=1):
            assert max_num_seqs == 3  # room for the largest group
            self.model, self.n = model, max_new_tokens

        def run_group(self, name, prompts):
            calls.append((name, len(prompts)))
            outs = self.model.generate([torch.tensor(p) for p in prompts], max_new_tokens=self.n, speculate=False)
            return [o.tokens for o in outs], 0.01 * len(prompts)

        def describe(self):
            return {"version": "fake"}

        def close(self):
            calls.append(("closed", 0))

    monkeypatch.setattr(peer, "vllm_available", lambda: True)
    monkeypatch.setattr(benchmark.runner, "VLLMPeer", FakePeer)
    samples = [benchmark.Sample(f"s{i}", "qa", [f"question {i}?"]) for i in range(5)]
    batch = benchmark.run_batch_sizes(tiny, samples, [3], max_new_tokens=5, encode=byte_encoder,
                                      peers=["hf", "vllm_ngram", "vllm"])
    assert [(r["batch_size"], r["method"]) for r in batch["rows"]] == [
        (b, m) for b in (1, 3) for m in ("vanilla", "kangaroo", "vllm", "vllm_ngram")]
    assert ("vllm", 3) in calls and ("vllm_ngram", 2) in calls and calls[-1] == ("closed", 0)  # groups 3 + 2
    for r in batch["rows"]:
        assert (r["method"], r["same_as_batch_1"], r["new_tokens"]) == (r["method"], len(samples), len(samples) * 5)
        if r["method"] == "vllm":
            assert r["speedup_vs_vllm"] == 1.0
    assert batch["vllm"] == {"version": "fake"}
    assert "× vLLM (same batch)" in benchmark.batch_markdown(batch)


def test_cli_bench_batch_sizes_in_results(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(kf, "load", lambda *a, **k: tiny)
    encode_bytes(monkeypatch)
    code = cli.main(["bench", "--quick", "--methods", "hf", "vanilla", "kangaroo", "--max-new-tokens", "4",
                     "--batch-sizes", "1", "3", "--output-dir", str(tmp_path), "--name", "b"])
    assert code == 0
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["batch"]["batch_sizes"] == [1, 3] and data["batch"]["prompts"] == 6
    assert "Batch sizes (6 first turns" in (tmp_path / "b.md").read_text()


def test_tune_grid(tiny):
    other = kf.KangarooModel(tiny.hf_model, None, random_adapter(tiny.hf_model, 1, 9, threshold=0.0))
    result = benchmark.run_tune({"l2": tiny, "l1": other}, SAMPLES, [0.0, 0.9], [2], max_new_tokens=6,
                                encode=byte_encoder, lookups=[0, 2])
    assert len(result["rows"]) == 2 * 2 * 2 * 3  # adapters x thresholds x lookups x (2 categories + overall)
    assert {r["lookup"] for r in result["rows"]} == {0, 2}
    assert set(result["best"]) == {"conversation", "math", "overall"}
    assert {r["exit_layer"] for r in result["rows"]} == {1, 2}
    assert all(r["mismatches_vs_vanilla"] == 0 for r in result["rows"])
    for category, best in result["best"].items():
        same = [r for r in result["rows"] if r["category"] == category]
        assert best["speedup_vs_vanilla"] == max(r["speedup_vs_vanilla"] for r in same)
    table = benchmark.tune_markdown(result).splitlines()
    assert table[2 + len(result["best"]) - 1].startswith("| overall |")
    grid = table[table.index("Every setting, overall (fastest first):") + 4:]
    assert len(grid) == 8
    speedups = [float(line.split("|")[6]) for line in grid]
    assert speedups == sorted(speedups, reverse=True)
    with pytest.raises(ValueError, match="threshold=2.0"):
        benchmark.run_tune({"l2": tiny}, SAMPLES, [0.5, 2.0], [2], max_new_tokens=6, encode=byte_encoder)
    with pytest.raises(ValueError, match="max_draft_steps=0"):
        benchmark.run_tune({"l2": tiny}, SAMPLES, [0.5], [0], max_new_tokens=6, encode=byte_encoder)
    with pytest.raises(ValueError, match="at least one"):
        benchmark.run_tune({"l2": tiny}, SAMPLES, [], [2], max_new_tokens=6, encode=byte_encoder)
    with pytest.raises(ValueError, match="lookup=-1"):
        benchmark.run_tune({"l2": tiny}, SAMPLES, [0.5], [2], max_new_tokens=6, encode=byte_encoder, lookups=[-1])


def test_cli_tune_runs_on_the_tune_split(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(kf, "load", lambda *a, **k: tiny)
    encode_bytes(monkeypatch)
    grid = ["--thresholds", "0.5", "--steps", "2", "--max-new-tokens", "3", "--output-dir", str(tmp_path)]
    assert cli.main(["tune", "--per-category", "1", "--name", "t", *grid]) == 0
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["split"] == "tune" and data["prompts"] == 6
    assert cli.main(["tune", "--held-out", "2", "--skip", "0", "--name", "h", *grid]) == 0
    assert json.loads((tmp_path / "h.json").read_text())["split"] is None  # training instructions, no split


# ---- the checkout's bench tooling ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def report():
    """bench/report.py, loaded from its file as the scripts of bench/ are (bench/ is no package)."""
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_library_cli_has_no_readme_option(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--readme", "README.md"])
    assert "unrecognized arguments: --readme" in capsys.readouterr().err


def test_readme_block_is_rewritten(report, tiny_result, tmp_path):
    result = {"command": "kangaroo-fast bench --quick", "model": "tiny-llama", "machine": benchmark.machine_info(),
              **tiny_result}
    paths = benchmark.write_results(result, tmp_path / "bench" / "results", "bench-quick-cpu")
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{report.README_START}\nold numbers\n{report.README_END}\nafter\n")
    paths = report.complete(paths, {"commit": "0123456789abcdef", "dirty": True}, readme)
    assert paths["plot"] == tmp_path / "bench" / "results" / "bench-quick-cpu.png"
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    machine = json.loads(paths["json"].read_text())["machine"]
    assert machine["commit"] == "0123456789abcdef" and machine["dirty"] is True
    text = readme.read_text()
    assert "old numbers" not in text
    assert text.startswith("# title\n\nbefore\n") and text.endswith(f"{report.README_END}\nafter\n")
    assert "`kangaroo-fast bench --quick`" in text and "4 prompts" in text
    assert "commit 0123456789ab (uncommitted changes)" in text
    assert "(bench/results/bench-quick-cpu.json)" in text and "](bench/results/bench-quick-cpu.png)" in text
    assert benchmark.markdown_table(result).splitlines()[2] in text
    report.update_readme(readme, json.loads(paths["json"].read_text()), paths)  # a second run replaces it, once
    assert readme.read_text() == text


def test_report_runs_the_bench_then_adds_commit_plot_and_readme(report, tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(kf, "load", lambda *a, **k: tiny)
    encode_bytes(monkeypatch)
    readme = tmp_path / "README.md"
    readme.write_text(f"{report.README_START}\n{report.README_END}\n")
    code = report.main(["--readme", str(readme), "--quick", "--methods", "hf", "vanilla", "kangaroo",
                        "--max-new-tokens", "3", "--output-dir", str(tmp_path), "--name", "q"])
    assert code == 0
    data = json.loads((tmp_path / "q.json").read_text())
    assert data["command"] == ("kangaroo-fast bench --quick --methods hf vanilla kangaroo --max-new-tokens 3 "
                               f"--output-dir {tmp_path} --name q")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert data["machine"]["commit"] == (head or None) and "dirty" in data["machine"]
    assert (tmp_path / "q.png").exists() and "](q.png)" in readme.read_text()
    assert "| kangaroo_fast Kangaroo |" in capsys.readouterr().out


def test_report_checks_the_readme_before_the_run(report, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(kf, "load", lambda *a, **k: pytest.fail("the model must not be loaded"))
    readme = tmp_path / "README.md"
    readme.write_text("# no block here\n")
    assert report.main(["--readme", str(readme), "--quick"]) == 2
    assert "needs one benchmark block" in capsys.readouterr().err
    assert report.main(["--readme", str(tmp_path / "absent.md")]) == 2
    assert "absent.md" in capsys.readouterr().err
    assert report.main(["--methods", "vanilla"]) == 2  # the library's own checks, still before the model
    assert "must include 'hf'" in capsys.readouterr().err


def test_git_info_outside_a_checkout(report, tmp_path):
    assert report.git_info(tmp_path) == {"commit": None, "dirty": None}


def test_micro_harness_statistics(report, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_harness", ROOT / "bench" / "harness.py")
    harness = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, harness)  # dataclasses look their module up there
    monkeypatch.setitem(sys.modules, "report", report)  # harness imports it from its own folder
    spec.loader.exec_module(harness)
    m = harness.Measurement.from_times([4.0, 1.0, 3.0, 2.0, 5.0], 2_000_000, op="linear", case="T=1",
                                       shape="s", provider="torch", device="cpu", dtype="float32")
    assert (m.median_ms, m.min_ms, m.max_ms, m.rounds) == (3.0, 1.0, 5.0, 5)
    assert m.iqr_ms == pytest.approx(4.5 - 1.5)  # quartiles of 1..5 (exclusive method)
    assert m.gbps == pytest.approx(2e6 / 3e-3 / 1e9)
    assert harness.Measurement.from_times([2.0], None, op="accept", case="k=6", shape="s", provider="torch",
                                          device="cpu", dtype="float32").gbps is None
    calls = []
    times = harness.time_op(lambda: calls.append(1), torch.device("cpu"))
    assert harness.MIN_ROUNDS <= len(times) <= harness.MAX_ROUNDS and len(calls) == len(times) + 2
    assert harness.tensor_bytes(torch.zeros(3, 5), torch.zeros(7, dtype=torch.bfloat16), None) == 3 * 5 * 4 + 14
    assert harness.providers()[0] == "torch"
    cos, sin = harness.rope_table(9, 6)
    assert torch.allclose(cos ** 2 + sin ** 2, torch.ones(9, 6)) and torch.equal(cos[:, :3], cos[:, 3:])


def test_microbenchmarks_run_against_the_current_engine(tmp_path):
    """The microbenchmarks call the engine's phases directly: one quick pass (timing off) catches a signature
    drift that would otherwise surface only in `make bench`."""
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             str(ROOT / "bench" / "test_micro.py"), "-k", "smollm2", "--benchmark-disable",
                             "--micro-output", str(tmp_path / "micro")],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


def test_step_breakdown_splits_a_step_into_products_attention_and_the_rest():
    """bench/step_breakdown.py runs against the current engine (the embedded model, float32, a few repeats)."""
    spec = importlib.util.spec_from_file_location("step_breakdown", ROOT / "bench" / "step_breakdown.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    times = module.breakdown(context=9, repeats=2, dtype="float32")
    assert times.pop("cache dtype") == "float32"
    assert set(times) == {"step", "products", "attention", "rest", "draft step", "draft 2 steps", "draft products"}
    assert all(times[name] > 0 for name in ("step", "products", "attention", "draft step", "draft products"))
    assert times["rest"] == pytest.approx(times["step"] - times["products"] - times["attention"])


def test_step_breakdown_times_verifications_of_several_positions(monkeypatch):
    """--verify-widths: Engine.verify from the exit layer over the last token and width - 1 drafts, beside the
    vanilla step (Engine.verify from layer 0 with no drafts)."""
    from kangaroo_fast.engine import Engine

    spec = importlib.util.spec_from_file_location("step_breakdown", ROOT / "bench" / "step_breakdown.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    seen = set()
    verify = Engine.verify

    def recording(self, rnd, first, settings, generator=None):
        seen.add((first, len(rnd.tokens[0])))
        return verify(self, rnd, first, settings, generator)

    monkeypatch.setattr(Engine, "verify", recording)
    times = module.breakdown(context=9, repeats=2, dtype="float32", verify_widths=(1, 3))
    assert {"vanilla step", "verify 1", "verify 3"} <= set(times)
    assert all(times[name] > 0 for name in ("vanilla step", "verify 1", "verify 3"))
    assert seen == {(0, 0), (2, 0), (2, 2)}  # the embedded model's exit layer 2: one and three positions


def test_linear_rows_times_every_product_on_every_path():
    """bench/linear_rows.py runs: each product of the embedded model on each path this CPU has, at each row count."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("linear_rows", ROOT / "bench" / "linear_rows.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    from kangaroo_fast.backend.fbgemm import fp16_products

    rows = module.timings([1, 3], repeats=1)
    assert {r["product"] for r in rows} == {"qkv", "o", "gate/up", "down", "LM head"}
    paths = 4 if fp16_products() else 3  # FBGEMM's float16 path where the CPU has no bf16 products
    assert len({r["path"] for r in rows}) == paths and len(rows) == 5 * paths
    assert all(set(r["ms"]) == {1, 3} and min(r["ms"].values()) > 0 for r in rows)
