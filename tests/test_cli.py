"""kangaroo-fast generate: JSON output equals HF greedy; bad arguments fail with exit code 2 and a message."""
import json

import pytest

from kangaroo_fast import cli


def test_generate_json_matches_hf(default_model, capsys):
    model, reference = default_model.model, default_model.reference
    code = cli.main(["generate", "Name three primary colours.", "--json", "--max-new-tokens", "12",
                     "--dtype", "float32"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    ids = model.encode("Name three primary colours.")
    eos = sorted(model.eos_ids())
    want = reference.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=eos[0])
    assert result["tokens"] == want[0, ids.shape[1]:].tolist()
    assert result["stats"]["new_tokens"] == len(result["tokens"])
    assert result["stats"]["dtype"] == "float32"
    for lookup in ("0", "3"):  # the lookup changes the drafts, never the output
        assert cli.main(["generate", "Name three primary colours.", "--json", "--max-new-tokens", "12",
                         "--dtype", "float32", "--lookup", lookup]) == 0
        again = json.loads(capsys.readouterr().out)
        assert again["tokens"] == result["tokens"]
        assert (again["stats"]["lookup_drafts"] == 0) == (lookup == "0")


@pytest.mark.parametrize("args, message", [
    (["--exit-layer", "0"], "exit_layer=0"),
    (["--threshold", "1.5"], "threshold=1.5"),
    (["--max-draft-steps", "0"], "max_draft_steps=0"),
    (["--lookup", "-2"], "lookup=-2"),
])
def test_generate_rejects_bad_settings(args, message, capsys):
    code = cli.main(["generate", "Hello", "--dtype", "float32", *args])
    assert code == 2
    assert message in capsys.readouterr().err


def test_missing_model_path_is_an_error(tmp_path, capsys):
    code = cli.main(["generate", "Hello", "--model", str(tmp_path / "absent")])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_generate_prints_only_its_own_lines(default_model, tmp_path):
    """stdout is the answer and stderr the statistics line alone: no transformers load bar, and no tokenizer
    warning, even from a converted model whose tokenizer config still asks for cleanup (conversions made before the
    embedded model's tokenizer was saved without it)."""
    import os
    import shutil
    import subprocess
    import sys

    from kangaroo_fast.models import DEFAULT_MODEL_NAME, default_model_dir

    cache = tmp_path / "kangaroo_fast" / DEFAULT_MODEL_NAME
    shutil.copytree(default_model_dir(), cache)
    config = json.loads((cache / "tokenizer_config.json").read_text())
    (cache / "tokenizer_config.json").write_text(json.dumps({**config, "clean_up_tokenization_spaces": True}))
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, "-m", "kangaroo_fast.cli", "generate", "Say hi.", "--max-new-tokens", "6",
                          "--dtype", "float32"], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip()
    assert [line for line in run.stderr.splitlines() if line.strip()] == [
        next(line for line in run.stderr.splitlines() if line.startswith("[kangaroo | float32 on cpu]"))]
