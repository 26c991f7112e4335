"""The benchmark's prompts: the shipped prompt set and Spec-Bench question files, their splits (settings are chosen on
"tune" only; the README reports "report"), and the chat encoding every method decodes from."""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

# the prompt set ships in the package, so an installed wheel benchmarks without the source checkout
DEFAULT_PROMPTS = Path(__file__).resolve().parents[1] / "data" / "prompts.jsonl"


@dataclass
class Sample:
    """One benchmark item: an id, a category and its user turns (only the first is used unless asked); ``split``
    names the part of the prompt set it belongs to where the file says (None where it does not)."""

    id: str
    category: str
    turns: list[str]
    split: str | None = None


def _parse_jsonl(path: Path, id_key: str) -> list[Sample]:
    """Read ``path`` line by line; every problem is reported as ``path:line: what is wrong``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"questions file {str(path)!r} does not exist")
    samples = []
    seen: dict[str, int] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        if id_key not in row:
            raise ValueError(f"{where}: missing {id_key!r}")
        if not isinstance(row[id_key], (int, str)) or isinstance(row[id_key], bool):
            raise ValueError(f"{where}: {id_key!r} must be an integer or a string, got {row[id_key]!r}")
        turns = row.get("turns")
        if not isinstance(turns, list) or not turns:
            raise ValueError(f"{where}: 'turns' must be a non-empty list of strings, got {turns!r}")
        for i, turn in enumerate(turns):
            if not isinstance(turn, str) or not turn.strip():
                raise ValueError(f"{where}: turn {i} must be a non-empty string, got {turn!r}")
        category = row.get("category", "questions")
        if not isinstance(category, str) or not category.strip():
            raise ValueError(f"{where}: 'category' must be a non-empty string, got {category!r}")
        split = row.get("split")
        if split is not None and (not isinstance(split, str) or not split.strip()):
            raise ValueError(f"{where}: 'split' must be a non-empty string where given, got {split!r}")
        sample_id = str(row[id_key])
        if sample_id in seen:
            raise ValueError(f"{where}: {id_key} {sample_id!r} repeats line {seen[sample_id]}")
        seen[sample_id] = number
        samples.append(Sample(sample_id, category, list(turns), split))
    if not samples:
        raise ValueError(f"{path}: no questions in the file")
    return samples


def load_questions(path: str | Path) -> list[Sample]:
    """A Spec-Bench ``question.jsonl`` (``question_id``, ``category``, ``turns``): the first turn of each."""
    return [Sample(s.id, s.category, s.turns[:1], s.split) for s in _parse_jsonl(Path(path), "question_id")]


def load_prompts(path: str | Path = DEFAULT_PROMPTS, all_turns: bool = True) -> list[Sample]:
    """This project's prompt set (``id``, ``category``, ``turns``, optionally ``split``); only the first turns
    unless ``all_turns``."""
    samples = _parse_jsonl(Path(path), "id")
    return samples if all_turns else [Sample(s.id, s.category, s.turns[:1], s.split) for s in samples]



# the shipped prompt set's two parts: settings are chosen on "tune" only, and the README reports "report"
SPLITS = ("report", "tune")


def select_split(samples: list[Sample], split: str) -> list[Sample]:
    """The samples of ``split`` ("report", "tune", or "all" for every sample), in file order. A file that names no
    split at all is taken whole, whatever ``split`` says."""
    if split not in (*SPLITS, "all"):
        raise ValueError(f"split={split!r} must be one of {', '.join(SPLITS)}, all")
    if split == "all" or all(s.split is None for s in samples):
        return samples
    chosen = [s for s in samples if s.split == split]
    if not chosen:
        named = sorted({s.split for s in samples if s.split is not None})
        raise ValueError(f"no prompts in split {split!r} (the file names {', '.join(named)})")
    return chosen


def per_category(samples: list[Sample], limit: int | None) -> list[Sample]:
    """The first ``limit`` samples of each category, in file order (all of them for None)."""
    if limit is None:
        return samples
    if not isinstance(limit, int) or limit < 1:
        raise ValueError(f"per_category={limit!r} must be an integer >= 1")
    taken: dict[str, int] = defaultdict(int)
    chosen = []
    for sample in samples:
        if taken[sample.category] < limit:
            taken[sample.category] += 1
            chosen.append(sample)
    return chosen


def chat_encoder(model) -> Callable[[list[dict]], torch.Tensor]:
    """messages -> [1, n] ids through the tokenizer's chat template (plain text when it has none)."""
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError("this model has no tokenizer: pass an encoder for its prompts")

    def encode(messages: list[dict]) -> torch.Tensor:
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]
        else:
            ids = tokenizer("\n".join(m["content"] for m in messages))["input_ids"]
        return torch.tensor([list(ids)], dtype=torch.int64, device=model.device)

    return encode
