"""The benchmark prompt set (its tune and report splits, and --split) and the offline training text (no model
needed)."""
import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from kangaroo_fast import cli
from kangaroo_fast.benchmark import SPLITS, load_prompts, select_split
from kangaroo_fast.cli import build_parser
from kangaroo_fast.train.instructions import (bench_prompts, bootstrap_instructions, local_documentation_texts,
                                             training_instructions)

BENCH = Path(__file__).resolve().parents[1] / "kangaroo_fast" / "data" / "prompts.jsonl"
CATEGORIES = {"conversation", "translation", "summarization", "qa", "math", "rag"}


def _windows(text: str, size: int = 8) -> set:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + size]) for i in range(len(words) - size + 1)}


def test_bench_prompts_parse_and_cover_categories():
    lines = [line for line in BENCH.read_text(encoding="utf-8").splitlines() if line.strip()]
    items = [json.loads(line) for line in lines]
    assert items == bench_prompts() == bench_prompts(BENCH)
    counts = Counter((item["split"], item["category"]) for item in items)
    assert {split for split, _ in counts} == set(SPLITS) == {"tune", "report"}
    assert all(counts[split, c] >= 10 for split in SPLITS for c in CATEGORIES), counts
    assert {c for _, c in counts} == CATEGORIES
    ids = [item["id"] for item in items]
    assert len(ids) == len(set(ids))
    for item in items:
        prefix = item["category"] + "-" if item["split"] == "report" else f"tune-{item['category']}-"
        assert re.fullmatch(re.escape(prefix) + r"\d\d", item["id"]), item["id"]
        assert item["turns"] and all(isinstance(t, str) and t.strip() for t in item["turns"])
        if item["category"] == "conversation":
            assert len(item["turns"]) >= 2
    assert bench_prompts(BENCH.parent / "missing.jsonl") == []


def _split(name: str) -> list[dict]:
    return [item for item in bench_prompts() if item["split"] == name]


def test_tune_prompts_share_no_8_word_run_with_report_prompts():
    report_windows = set().union(*(_windows(t) for item in _split("report") for t in item["turns"]))
    for item in _split("tune"):
        for turn in item["turns"]:
            assert not _windows(turn) & report_windows, item["id"]


def test_tune_conversations_have_two_turns_and_summaries_long_passages():
    for item in _split("tune"):
        if item["category"] == "conversation":
            assert len(item["turns"]) == 2, item["id"]
        if item["category"] == "summarization":
            # the request is the first or the last paragraph; the passage is everything else
            blocks = item["turns"][0].split("\n\n")
            passage = max(len(re.findall(r"\w+", " ".join(part))) for part in (blocks[1:], blocks[:-1]))
            assert passage >= 150, (item["id"], passage)


def test_bench_filter_of_the_instruction_generator_covers_both_splits():
    from kangaroo_fast.train.instructions import BENCH_PATH, _BenchFilter

    assert BENCH_PATH == BENCH
    bench_filter = _BenchFilter(bench_prompts())
    for split in SPLITS:
        for item in _split(split):
            for turn in item["turns"]:
                assert not bench_filter.allows(turn), item["id"]
                if len(re.findall(r"\w+", turn)) >= 8:  # a shorter turn is caught only when equal to it
                    assert not bench_filter.allows("Well, " + turn + " Thanks."), item["id"]


def _prompt_args(*argv: str):
    args = build_parser().parse_args(list(argv))
    return args, cli._bench_samples(args, all_turns=False)


def test_split_selects_the_prompts():
    by_split = {split: [item["id"] for item in _split(split)] for split in SPLITS}
    args, samples = _prompt_args("bench")
    assert args.split == "report" and [s.id for s in samples] == by_split["report"]
    assert cli._split_used(args) == "report"
    args, samples = _prompt_args("tune")
    assert args.split == "tune" and [s.id for s in samples] == by_split["tune"]
    assert [s.id for s in _prompt_args("tune", "--split", "report")[1]] == by_split["report"]
    assert [s.id for s in _prompt_args("bench", "--split", "tune")[1]] == by_split["tune"]
    assert [s.id for s in _prompt_args("bench", "--split", "all")[1]] == [item["id"] for item in bench_prompts()]
    _, samples = _prompt_args("bench", "--split", "tune", "--per-category", "2")
    assert Counter(s.category for s in samples) == {c: 2 for c in CATEGORIES}
    assert all(s.split == "tune" and s.id.startswith("tune-") for s in samples)
    assert [s.id for s in select_split(load_prompts(), "report")] == by_split["report"]


def test_split_and_other_prompt_files(tmp_path):
    questions = tmp_path / "question.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "category": "qa", "turns": [f"q{i}"]}) + "\n"
                                 for i in range(3)))
    args, samples = _prompt_args("bench", "--questions", str(questions), "--split", "tune")
    assert [s.id for s in samples] == ["0", "1", "2"] and cli._split_used(args) is None  # no splits in Spec-Bench
    plain = tmp_path / "prompts.jsonl"
    plain.write_text("".join(json.dumps({"id": f"p{i}", "category": "qa", "turns": ["hi"]}) + "\n" for i in range(2)))
    assert [s.id for s in _prompt_args("bench", "--prompts", str(plain))[1]] == ["p0", "p1"]  # no split: all of it
    tuned = tmp_path / "tuned.jsonl"
    tuned.write_text(json.dumps({"id": "t", "category": "qa", "split": "tune", "turns": ["hi"]}) + "\n"
                     + json.dumps({"id": "u", "category": "qa", "turns": ["hi"]}) + "\n")
    assert [s.id for s in _prompt_args("bench", "--prompts", str(tuned), "--split", "tune")[1]] == ["t"]
    assert [s.id for s in _prompt_args("bench", "--prompts", str(tuned), "--split", "all")[1]] == ["t", "u"]
    with pytest.raises(ValueError, match="no prompts in split 'report' \\(the file names tune\\)"):
        _prompt_args("bench", "--prompts", str(tuned))
    with pytest.raises(ValueError, match="split='dev' must be one of report, tune, all"):
        select_split(load_prompts(), "dev")


@pytest.mark.parametrize("command", ["bench", "tune"])
@pytest.mark.parametrize("value", ["dev", "Report", "test", ""])
def test_bad_split_is_refused_by_argparse(command, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--split", value])
    assert exit_info.value.code == 2
    assert "--split: invalid choice" in capsys.readouterr().err


def test_training_instructions_distinct_deterministic_and_disjoint_from_bench():
    first = training_instructions(2000, seed=0)
    assert len(first) == 2000 and len(set(first)) == 2000
    assert all(isinstance(t, str) and t.strip() for t in first)
    assert training_instructions(2000, seed=0) == first
    assert training_instructions(300, seed=0) == first[:300]
    assert training_instructions(2000, seed=1) != first
    turns = [turn for item in bench_prompts() for turn in item["turns"]]
    bench_windows = set().union(*(_windows(t) for t in turns))
    assert not set(first) & set(turns)
    assert not any(_windows(t) & bench_windows for t in first)


def test_local_documentation_texts():
    texts = local_documentation_texts(50000)
    total = sum(len(t) for t in texts)
    assert texts and all(isinstance(t, str) and t.strip() for t in texts)
    assert 10000 < total <= 50000
    assert local_documentation_texts(50000) == texts
    assert local_documentation_texts(50000, seed=1) != texts


ANSWER = ("Composting turns kitchen scraps into rich soil for the garden.\n\n"
          "1. **Choose a bin**: Pick a container with a lid and holes for air, and place it in a shady spot.\n"
          "2. **Balance greens and browns**: Mix fresh scraps with dry leaves or paper so the pile does not smell.\n\n"
          "Turn the pile every week or two, and keep it about as damp as a wrung-out sponge. After a few months "
          "the material becomes dark and crumbly, and it is ready to spread on your beds.")


def _stage_one(n: int) -> tuple[list[str], list[str]]:
    instructions = [f"How do I start a compost pile in place number {i}?" for i in range(n)]
    answers = [ANSWER.replace("garden", f"garden {i}") for i in range(n)]
    return instructions, answers


def test_bootstrap_instructions_quote_the_answers_deterministically_and_avoid_bench():
    instructions, answers = _stage_one(40)
    second = bootstrap_instructions(instructions, answers, 200, seed=0)
    assert len(second) == 200 and len(set(second)) == 200
    assert bootstrap_instructions(instructions, answers, 200, seed=0) == second
    assert bootstrap_instructions(instructions, answers, 200, seed=1) != second
    # every item carries text of an answer: a passage, or one of its sentences (list markers and ** removed)
    plain = re.sub(r"\*\*|\n\d\. ", " ", ANSWER)
    openings = {part.strip()[:30] for part in re.split(r"[.:]\s", plain) if len(part.strip()) >= 30}
    assert all(any(opening in t.replace("**", " ") for opening in openings) for t in second)
    assert all("**" not in t for t in second if "Translate" in t or "translate" in t)
    assert any("Question: How do I start a compost pile" in t for t in second)  # context questions
    turns = [turn for item in bench_prompts() for turn in item["turns"]]
    bench_windows = set().union(*(_windows(t) for t in turns))
    assert not any(_windows(t) & bench_windows for t in second)


def test_bootstrap_instructions_bad_input_is_named():
    instructions, answers = _stage_one(3)
    with pytest.raises(ValueError, match="3 instructions but 2 answers"):
        bootstrap_instructions(instructions, answers[:2], 5)
    with pytest.raises(ValueError, match="n must be >= 0"):
        bootstrap_instructions(instructions, answers, -1)
    with pytest.raises(ValueError, match=r"only \d+ distinct second-stage instructions from 1 answers, asked for 5000"):
        bootstrap_instructions(["Hi?"], ["Too short to quote."], 5000)


# sha256 of "\n".join(items), computed from the code before the word lists moved to a data file: the training text
# (and so the shipped adapter's recipe) must not change when the lists move or are reformatted
PINNED = {("training", 0, 40000): "a3efeeed01b815c280c2464ff645bdb22035109f9610345ca89b5a91b466081c",
          ("training", 1, 20000): "5b714a73db11d75fcaf596967e38ecf66a36927e3f4418ff348f70d5e0f13fc6",
          ("bootstrap", 0, 500): "11c2d35d54efb0d3186b946ad9b4c19673eaedae9830fa83d66eb59e8ba8802a"}


def _digest(items: list[str]) -> str:
    return hashlib.sha256("\n".join(items).encode("utf-8")).hexdigest()


def test_instruction_text_is_pinned(monkeypatch):
    """The generators over every word list and template, without the bench filter (the prompt set may grow
    without changing the pinned text): 40000 items spend every finite pool."""
    import kangaroo_fast.train.instructions as instructions

    monkeypatch.setattr(instructions, "bench_prompts", lambda path=None: [])
    for seed, n in ((0, 40000), (1, 20000)):
        assert _digest(training_instructions(n, seed=seed)) == PINNED["training", seed, n], (seed, n)
    answers = [f"Sentence number {i} talks about apples and pears in the garden. " * 3 + "\n\n"
               + f"Another paragraph {i}: 1. **First** point is long enough to be quoted here. "
                 f"2. Second one also qualifies as such." * 4 for i in range(30)]
    questions = [f"Tell me about fruit number {i}?" for i in range(30)]
    assert _digest(bootstrap_instructions(questions, answers, 500, seed=0)) == PINNED["bootstrap", 0, 500]


def test_bench_filter_keeps_the_pinned_training_text():
    """With the bench filter on, both splits of the prompt set drop no generated instruction today (the handwritten
    prompts share no 8-word run with any template output), so the training text is the pinned one. A prompt added
    later that collides with the generator fails here: reword it rather than change what the adapter trains on."""
    for seed, n in ((0, 40000), (1, 20000)):
        assert _digest(training_instructions(n, seed=seed)) == PINNED["training", seed, n], (seed, n)
