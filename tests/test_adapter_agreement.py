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
