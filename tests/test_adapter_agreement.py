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
