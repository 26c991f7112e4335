"""The benchmark prompt set and the offline training text (no model needed)."""
import json
import re
from collections import Counter
from pathlib import Path

from kangaroo_fast.train.instructions import bench_prompts, local_documentation_texts, training_instructions

BENCH = Path(__file__).resolve().parents[1] / "bench" / "prompts.jsonl"
CATEGORIES = {"conversation", "translation", "summarization", "qa", "math", "rag"}


def _windows(text: str, size: int = 8) -> set:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + size]) for i in range(len(words) - size + 1)}


def test_bench_prompts_parse_and_cover_categories():
    lines = [line for line in BENCH.read_text(encoding="utf-8").splitlines() if line.strip()]
    items = [json.loads(line) for line in lines]
    assert items == bench_prompts() == bench_prompts(BENCH)
    counts = Counter(item["category"] for item in items)
    assert set(counts) == CATEGORIES
    assert all(counts[c] >= 8 for c in CATEGORIES), counts
    ids = [item["id"] for item in items]
    assert len(ids) == len(set(ids))
    for item in items:
        assert item["id"].startswith(item["category"] + "-")
        assert item["turns"] and all(isinstance(t, str) and t.strip() for t in item["turns"])
        if item["category"] == "conversation":
            assert len(item["turns"]) >= 2
    assert bench_prompts(BENCH.parent / "missing.jsonl") == []


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
