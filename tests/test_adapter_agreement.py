"""bench/adapter_agreement.py: argument handling (its real run needs the embedded model and a minute)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "adapter_agreement.py"


def _module():
    spec = importlib.util.spec_from_file_location("adapter_agreement", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bad_token_count_is_named(capsys):
    with pytest.raises(SystemExit):
        _module().main(["--max-new-tokens", "1"])
    assert "--max-new-tokens=1 must be >= 2" in capsys.readouterr().err


def test_missing_adapter_directory_fails_before_decoding(tmp_path):
    with pytest.raises((FileNotFoundError, ValueError, OSError)):
        _module().main(["--adapter", str(tmp_path / "nowhere"), "--max-new-tokens", "4"])


def test_context_copy_right_against_a_hand_count():
    # prompt 5 6 7, answer 5 6 8 5 6: after each answer token, the token that followed its latest earlier occurrence
    sequence = [5, 6, 7, 5, 6, 8, 5, 6]
    targets = [0, 0, 0, 6, 8, 5, 6, 0]  # the full model's next token at each position (the last one unused)
    right = _module().context_copy_right(sequence, 3, targets)
    # t=3 (5): 6 ✓; t=4 (6): 7 vs 8 ✗; t=5 (8): none ✗; t=6 (5): latest 5 at 3 -> 6 ✓
    assert right.tolist() == [True, False, False, True]


def test_bad_draft_cost_and_split_are_named(capsys):
    with pytest.raises(SystemExit):
        _module().main(["--draft-cost", "-0.5"])
    assert "--draft-cost=-0.5 must be a finite number >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _module().main(["--split", "train"])
    assert "invalid choice: 'train'" in capsys.readouterr().err


def _predictions():
    import torch

    # one answer from position 0: drafts right at 0-3, wrong at 4, right after; confidences as written
    correct = torch.tensor([True, True, True, True, False, True, True, True, True, True])
    conf = torch.tensor([0.9, 0.7, 0.6, 0.9, 0.2, 0.9, 0.9, 0.9, 0.9, 0.9])
    return [(correct, conf)]


def test_cumulative_rule_stops_on_the_product_of_the_rounds_confidences():
    from kangaroo_fast.train.distill import simulate_rounds

    # per step at 0.5: round 1 drafts positions 0-4 (0.2 < 0.5 stops it after the 5th), accepts 4, emits 5 (p=5);
    # round 2 drafts positions 5-7 (the answer's end leaves room for 3), accepts 3, emits 4 (p=9, done)
    step = simulate_rounds(_predictions(), [0], 0.5, 8)
    assert (step["mean_accepted"], step["drafts_per_round"]) == (4.5, 4.0)
    # cumulative at 0.5: 0.9, 0.63, then 0.378 < 0.5 stops round 1 after 3 drafts (3 accepted, emits 4: p=4);
    # round 2: 0.2 stops after 1 draft, rejected (emits 1: p=5); round 3: 0.9, 0.81, 0.729 (room 3), emits 4 (p=9)
    cumulative = simulate_rounds(_predictions(), [0], 0.5, 8, cumulative=True)
    assert cumulative["cumulative"] is True
    assert (cumulative["mean_accepted"], cumulative["drafts_per_round"]) == (3.0, 7 / 3)


def test_calibration_counts_and_accuracy_per_bin():
    rows = _module().calibration(_predictions(), [0], bins=10)
    # positions 0..8 (the last has no next token): confidences 0.9 0.7 0.6 0.9 0.2 0.9 0.9 0.9 0.9
    by_low = {round(r["low"], 1): (r["count"], r["accuracy"]) for r in rows}
    assert by_low[0.9] == (6, 1.0) and by_low[0.2] == (1, 0.0)
    assert by_low[0.7] == (1, 1.0) and by_low[0.6] == (1, 1.0)
    assert sum(r["count"] for r in rows) == 9


def test_in_draft_vocab_marks_what_the_head_can_propose():
    import torch

    targets = torch.tensor([5, 9, 2, 5, 100])
    assert _module().in_draft_vocab(targets, torch.tensor([2, 5, 7])).tolist() == [True, False, True, True, False]
    assert _module().in_draft_vocab(targets, None).tolist() == [True] * 5
