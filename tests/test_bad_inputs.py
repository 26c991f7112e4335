"""Every bad input, through the API, the command line or a file, fails with one clear error naming it.

One table: each case runs one bad input and names the exception type it must raise (or exit code 2 for the CLI)
and the strings its message must contain (the offending value, flag or file).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import torch

import kangaroo_fast as kf
from kangaroo_fast import Adapter, ModelConfig, cli
from kangaroo_fast.train.distill import Recipe

from conftest import random_adapter, tiny_model

CLI_EXIT = 2  # what a case expects in place of an exception type: the CLI's exit code for a user error


@dataclass
class Case:
    name: str
    run: Callable  # (ctx) -> None; raises, or (CLI) returns an exit code
    error: type | int
    names: tuple[str, ...]  # each must appear in the message

    def __str__(self) -> str:
        return self.name


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    """A tiny 4-layer llama on disk with an adapter beside it, and both loaded."""
    root = tmp_path_factory.mktemp("bad_inputs")
    hf = tiny_model("llama", 5)
    hf.save_pretrained(root / "model")
    adapter = random_adapter(hf, 2, seed=6)
    adapter.save(root / "adapter")
    km = kf.load(hf, adapter=adapter, max_cache_len=40)
    return SimpleNamespace(root=root, hf=hf, km=km, model_dir=root / "model", adapter_dir=root / "adapter",
                           model_config=ModelConfig.from_hf(hf.config), prompt=[4, 9, 17, 2])


# ---- building bad files: each copies the good model or adapter and spoils one thing -----------------------------
def _copy(source: Path, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


class _RunsCode:
    """A pickle that would create a file if it were ever unpickled with code execution allowed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def adapter_with(ctx, name: str, spoil: Callable[[Path], None]) -> Path:
    path = _copy(ctx.adapter_dir, ctx.root / "adapters" / name)
    spoil(path)
    return path


def model_with(ctx, name: str, spoil: Callable[[Path], None]) -> Path:
    path = _copy(ctx.model_dir, ctx.root / "models" / name)
    spoil(path)
    return path


def edit_json(file: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(file.read_text())
    change(data)
    file.write_text(json.dumps(data))


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:300])


def malicious_bin(ctx, folder: Path, keep: str) -> None:
    """Replace the safetensors weights by a pickle that runs a command when loaded unsafely."""
    (folder / keep).unlink()
    torch.save({"layers.0.input_layernorm.weight": _RunsCode(ctx.root / "code-ran")}, folder / "pytorch_model.bin")


def nan_weights(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    state["layers.0.self_attn.o_proj.weight"][0, 0] = float("nan")
    save_file(state, str(folder / "model.safetensors"))


def draft_vocab_file(folder: Path, ids: torch.Tensor) -> None:
    from safetensors.torch import save_file

    save_file({"draft_vocab": ids}, str(folder / "draft_vocab.safetensors"))


def load_adapter(ctx, name: str, spoil: Callable[[Path], None]) -> None:
    Adapter.load(adapter_with(ctx, name, spoil), ctx.model_config)


def load_model(ctx, name: str, spoil: Callable[[Path], None]) -> None:
    kf.load(str(model_with(ctx, name, spoil)))


def generate(**kwargs) -> Callable:
    return lambda ctx: ctx.km.generate(kwargs.pop("prompt", ctx.prompt), max_new_tokens=kwargs.pop("max_new", 3),
                                       **kwargs)


def cli_generate(*args: str) -> Callable:
    return lambda ctx: cli.main(["generate", "Hello", "--model", str(ctx.model_dir), "--adapter", str(ctx.adapter_dir),
                                 "--dtype", "float32", *args])


def recipe_file(ctx, name: str, text: str) -> Path:
    path = ctx.root / name
    path.write_text(text)
    return path


CASES = [
    # ---- the API: prompts ------------------------------------------------------------------------------------
    Case("bytes prompt", generate(prompt=b"hello"), TypeError, ("bytes",)),
    Case("bool token ids", generate(prompt=[True, False]), TypeError, ("bool", "True")),
    Case("float token id", generate(prompt=[4, 2.5]), TypeError, ("item 1", "2.5")),
    Case("float tensor prompt", generate(prompt=torch.ones(3)), TypeError, ("torch.float32",)),
    Case("token outside the vocabulary", generate(prompt=[4, 131]), ValueError, ("131", "0..130")),
    # ---- the API: settings -----------------------------------------------------------------------------------
    Case("max_new_tokens=True", generate(max_new=True), ValueError, ("max_new_tokens=True",)),
    Case("max_new_tokens=2.0", generate(max_new=2.0), ValueError, ("max_new_tokens=2.0",)),
    Case("exit_layer=True", generate(exit_layer=True), ValueError, ("exit_layer=True",)),
    Case("exit_layer=4 of 4 layers", generate(exit_layer=4), ValueError, ("exit_layer=4", "1..3")),
    Case("threshold=True", generate(threshold=True), ValueError, ("threshold=True",)),
    Case("threshold=nan", generate(threshold=float("nan")), ValueError, ("threshold=nan",)),
    Case("max_draft_steps=10**6", generate(max_draft_steps=10 ** 6), ValueError,
         ("max_draft_steps=1000000", "<= 38", "cache length 40")),
    Case("max_draft_steps=10**8", generate(max_draft_steps=10 ** 8), ValueError, ("max_draft_steps=100000000",)),
    Case("max_draft_steps=True", generate(max_draft_steps=True), ValueError, ("max_draft_steps=True",)),
    Case("lookup=True", generate(lookup=True), ValueError, ("lookup=True",)),
    Case("temperature=1e-45", generate(temperature=1e-45), ValueError, ("temperature=1e-45", "0.0001")),
    Case("temperature=inf", generate(temperature=float("inf")), ValueError, ("temperature=inf",)),
    Case("top_k=True", generate(temperature=1.0, top_k=True), ValueError, ("top_k=True",)),
    Case("top_p=0", generate(temperature=1.0, top_p=0), ValueError, ("top_p=0",)),
    Case("seed=2**70", generate(temperature=1.0, seed=2 ** 70), ValueError, (f"seed={2 ** 70}", "2**64")),
    Case("seed=-1", generate(temperature=1.0, seed=-1), ValueError, ("seed=-1",)),
    Case("seed=True", generate(temperature=1.0, seed=True), ValueError, ("seed=True",)),
    Case("seed='7'", generate(temperature=1.0, seed="7"), ValueError, ("seed='7'",)),
    Case("generator='x'", generate(temperature=1.0, generator="x"), TypeError, ("generator='x'", "torch.Generator")),
    Case("seed and generator", generate(temperature=1.0, seed=1, generator=torch.Generator()), ValueError,
         ("seed=", "generator=")),
    Case("eos_token_id=2.0", generate(eos_token_id=2.0), TypeError, ("eos_token_id=2.0",)),
    Case("eos_token_id='2'", generate(eos_token_id="2"), TypeError, ("eos_token_id='2'",)),
    Case("eos_token_id=True", generate(eos_token_id=True), TypeError, ("eos_token_id=True",)),
    Case("eos_token_id=0-d float tensor", generate(eos_token_id=torch.tensor(2.0)), TypeError,
         ("eos_token_id=tensor(2.)",)),
    Case("eos_token_id=0-d tensor outside the vocabulary", generate(eos_token_id=torch.tensor(500)), ValueError,
         ("eos_token_id=500", "0..130")),
    Case("eos_token_id=[2, 2.5]", generate(eos_token_id=[2, 2.5]), ValueError, ("eos_token_id=2.5",)),
    # ---- the API: loading ------------------------------------------------------------------------------------
    Case("generate(model='some/path')", lambda ctx: kf.generate(ctx.prompt, model="some/path"), TypeError,
         ("model='some/path'", "kangaroo_fast.load")),
    Case("device='meta'", lambda ctx: kf.load(ctx.hf, device="meta"), ValueError, ("device='meta'",)),
    Case("device='tpu'", lambda ctx: kf.load(ctx.hf, device="tpu"), ValueError, ("device='tpu'",)),
    Case("device=3.5", lambda ctx: kf.load(ctx.hf, device=3.5), ValueError, ("device=3.5",)),
    Case("float draft_vocab", lambda ctx: random_adapter(ctx.hf, 2, 1, draft_vocab=torch.tensor([1.0, 2.7])),
         TypeError, ("draft_vocab", "torch.float32")),
    Case("duplicate draft_vocab ids", lambda ctx: random_adapter(ctx.hf, 2, 1, draft_vocab=[1, 4, 9, 4]),
         ValueError, ("draft_vocab", "id 4")),
    Case("adapter draft steps beyond the cache", lambda ctx: kf.load(ctx.hf, max_cache_len=20, adapter=random_adapter(
        ctx.hf, 2, 1, max_draft_steps=30)), ValueError, ("adapter setting", "max_draft_steps=30", "<= 18")),
    # ---- adapter files ---------------------------------------------------------------------------------------
    Case("adapter config.json not JSON", lambda ctx: load_adapter(
        ctx, "not-json", lambda p: (p / "config.json").write_text("{oops")), ValueError, ("config.json", "JSON")),
    Case("adapter config.json a list", lambda ctx: load_adapter(
        ctx, "list", lambda p: (p / "config.json").write_text("[1, 2]")), ValueError, ("config.json", "list")),
    Case("adapter hidden_size a string", lambda ctx: load_adapter(
        ctx, "str-hidden", lambda p: edit_json(p / "config.json", lambda d: d.update(hidden_size="48"))),
         ValueError, ("config.json", "hidden_size='48'")),
    Case("adapter rms_norm_eps negative", lambda ctx: load_adapter(
        ctx, "eps", lambda p: edit_json(p / "config.json", lambda d: d.update(rms_norm_eps=-1))),
         ValueError, ("config.json", "rms_norm_eps=-1")),
    Case("adapter threshold out of range", lambda ctx: load_adapter(
        ctx, "threshold", lambda p: edit_json(p / "config.json", lambda d: d["kangaroo"].update(threshold=1.5))),
         ValueError, ("config.json", "adapter setting", "threshold=1.5")),
    Case("adapter exit_layer a bool", lambda ctx: load_adapter(
        ctx, "exit-bool", lambda p: edit_json(p / "config.json", lambda d: d["kangaroo"].update(exit_layer=True))),
         ValueError, ("config.json", "exit_layer=True")),
    Case("adapter max_draft_steps a string", lambda ctx: load_adapter(
        ctx, "steps-str", lambda p: edit_json(p / "config.json",
                                              lambda d: d["kangaroo"].update(max_draft_steps="6"))),
         ValueError, ("config.json", "max_draft_steps='6'")),
    Case("adapter kangaroo section a list", lambda ctx: load_adapter(
        ctx, "section", lambda p: edit_json(p / "config.json", lambda d: d.update(kangaroo=[2]))),
         ValueError, ("config.json", "'kangaroo'")),
    Case("adapter model.safetensors truncated", lambda ctx: load_adapter(
        ctx, "truncated", lambda p: truncate(p / "model.safetensors")), ValueError, ("model.safetensors",)),
    Case("adapter weights with NaN", lambda ctx: load_adapter(ctx, "nan", nan_weights), ValueError,
         ("model.safetensors", "layers.0.self_attn.o_proj.weight", "NaN")),
    Case("adapter malicious pickle", lambda ctx: load_adapter(
        ctx, "pickle", lambda p: malicious_bin(ctx, p, "model.safetensors")), ValueError,
         ("pytorch_model.bin", "refused")),
    Case("adapter pytorch_model.bin truncated", lambda ctx: load_adapter(
        ctx, "truncated-bin", lambda p: (malicious_bin(ctx, p, "model.safetensors"),
                                         truncate(p / "pytorch_model.bin"))), ValueError, ("pytorch_model.bin",)),
    Case("adapter float draft vocabulary", lambda ctx: load_adapter(
        ctx, "vocab-float", lambda p: draft_vocab_file(p, torch.tensor([1.0, 2.0]))), TypeError,
         ("draft_vocab.safetensors", "torch.float32")),
    Case("adapter duplicate draft vocabulary", lambda ctx: load_adapter(
        ctx, "vocab-dup", lambda p: draft_vocab_file(p, torch.tensor([3, 5, 5]))), ValueError,
         ("draft_vocab.safetensors", "id 5")),
    # ---- model files -----------------------------------------------------------------------------------------
    Case("model path is a file", lambda ctx: kf.load(str(ctx.model_dir / "config.json")), ValueError,
         ("config.json", "is a file")),
    Case("model config.json not JSON", lambda ctx: load_model(
        ctx, "not-json", lambda p: (p / "config.json").write_text("{oops")), ValueError, ("config.json", "JSON")),
    Case("model config.json a list", lambda ctx: load_model(
        ctx, "list", lambda p: (p / "config.json").write_text("[]")), ValueError, ("config.json", "list")),
    Case("model without config.json", lambda ctx: load_model(
        ctx, "no-config", lambda p: (p / "config.json").unlink()), FileNotFoundError, ("no-config", "config.json")),
    Case("model hidden_size a string", lambda ctx: load_model(
        ctx, "str-hidden", lambda p: edit_json(p / "config.json", lambda d: d.update(hidden_size="48"))),
         ValueError, ("config.json", "hidden_size")),
    Case("model with -1 layers", lambda ctx: load_model(
        ctx, "layers", lambda p: edit_json(p / "config.json", lambda d: d.update(num_hidden_layers=-1))),
         ValueError, ("config.json", "num_hidden_layers=-1")),
    Case("model.safetensors truncated", lambda ctx: load_model(
        ctx, "truncated", lambda p: truncate(p / "model.safetensors")), ValueError, ("truncated", "model.safetensors")),
    Case("model malicious pickle", lambda ctx: load_model(
        ctx, "pickle", lambda p: malicious_bin(ctx, p, "model.safetensors")), ValueError,
         ("pytorch_model.bin", "refused")),
    # ---- recipe files ----------------------------------------------------------------------------------------
    Case("recipe not JSON", lambda ctx: Recipe.load(recipe_file(ctx, "bad.json", "{")),
         ValueError, ("bad.json", "JSON")),
    Case("recipe epochs a string", lambda ctx: Recipe.load(recipe_file(
        ctx, "epochs.json", '{"epochs": "4"}')), ValueError, ("epochs.json", "epochs='4'")),
    Case("recipe n_sampled -1", lambda ctx: Recipe.load(recipe_file(ctx, "sampled.json", '{"n_sampled": -1}')),
         ValueError, ("sampled.json", "n_sampled=-1")),
    Case("recipe base a number", lambda ctx: Recipe.load(recipe_file(ctx, "base-num.json", '{"base": 3}')),
         ValueError, ("base-num.json", "base=3")),
    Case("recipe base missing", lambda ctx: Recipe.load(recipe_file(ctx, "base-gone.json", '{"base": "gone.json"}')),
         FileNotFoundError, ("base-gone.json", "gone.json")),
    Case("recipe bases in a cycle", lambda ctx: (recipe_file(ctx, "cycle-b.json", '{"base": "cycle-a.json"}'),
                                                 Recipe.load(recipe_file(ctx, "cycle-a.json",
                                                                         '{"base": "cycle-b.json"}'))),
         ValueError, ("cycle-a.json", "cycle")),
    Case("recipe base with an unknown key", lambda ctx: (recipe_file(ctx, "base-bad.json", '{"epoch": 2}'),
                                                         Recipe.load(recipe_file(ctx, "child.json",
                                                                                 '{"base": "base-bad.json"}'))),
         ValueError, ("base-bad.json", "epoch")),
    # ---- the command line ------------------------------------------------------------------------------------
    Case("vllm-config --threshold 2", lambda ctx: cli.main(["vllm-config", "--threshold", "2"]), CLI_EXIT,
         ("threshold=2",)),
    Case("vllm-config --adapter-steps 9 > tokens", lambda ctx: cli.main(
        ["vllm-config", "--num-speculative-tokens", "4", "--adapter-steps", "9"]), CLI_EXIT, ("adapter_steps=9",)),
    Case("vllm-config --adapter missing", lambda ctx: cli.main(["vllm-config", "--adapter", str(ctx.root / "nope")]),
         CLI_EXIT, ("nope", "config.json")),
    Case("--temperature 1e-45", cli_generate("--temperature", "1e-45"), CLI_EXIT, ("temperature=1e-45",)),
    Case("--device tpu", cli_generate("--device", "tpu"), CLI_EXIT, ("device='tpu'",)),
    Case("--device meta", cli_generate("--device", "meta"), CLI_EXIT, ("device='meta'",)),
    Case("--max-draft-steps 1000000", cli_generate("--max-draft-steps", "1000000"), CLI_EXIT,
         ("max_draft_steps=1000000",)),
    Case("--seed 2**70", cli_generate("--temperature", "1", "--seed", str(2 ** 70)), CLI_EXIT, (f"seed={2 ** 70}",)),
    Case("--exit-layer 9", cli_generate("--exit-layer", "9"), CLI_EXIT, ("exit_layer=9",)),
    Case("--max-new-tokens abc", cli_generate("--max-new-tokens", "abc"), CLI_EXIT, ("--max-new-tokens", "'abc'")),
    Case("--dtype float64", cli_generate("--dtype", "float64"), CLI_EXIT, ("--dtype", "'float64'")),
    Case("--model truncated safetensors", lambda ctx: cli.main(["generate", "Hi", "--model", str(model_with(
        ctx, "cli-truncated", lambda p: truncate(p / "model.safetensors")))]), CLI_EXIT,
         ("cli-truncated", "model.safetensors")),
    Case("--model bad config.json", lambda ctx: cli.main(["generate", "Hi", "--model", str(model_with(
        ctx, "cli-config", lambda p: (p / "config.json").write_text("{oops")))]), CLI_EXIT,
         ("cli-config", "config.json")),
    Case("--adapter malicious pickle", lambda ctx: cli.main([
        "generate", "Hi", "--model", str(ctx.model_dir), "--adapter", str(adapter_with(
            ctx, "cli-pickle", lambda p: malicious_bin(ctx, p, "model.safetensors")))]), CLI_EXIT,
         ("cli-pickle", "pytorch_model.bin", "refused")),
    Case("train --epochs 0", lambda ctx: cli.main(["train", "--output", str(ctx.root / "out"), "--epochs", "0"]),
         CLI_EXIT, ("--epochs=0",)),
    Case("train --time-limit 0", lambda ctx: cli.main(["train", "--output", str(ctx.root / "out"), "--time-limit",
                                                      "0"]), CLI_EXIT, ("--time-limit=0",)),
    Case("train --recipe not JSON", lambda ctx: cli.main(["train", "--output", str(ctx.root / "out"), "--recipe", str(
        recipe_file(ctx, "cli-recipe.json", "[")), ]), CLI_EXIT, ("cli-recipe.json",)),
]


def test_the_table_covers_api_files_and_cli():
    assert len(CASES) >= 40
    assert len({case.name for case in CASES}) == len(CASES)
    assert sum(case.error == CLI_EXIT for case in CASES) >= 10


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input_fails_naming_it(ctx, case, capsys):
    if case.error == CLI_EXIT:
        try:
            code = case.run(ctx)
        except SystemExit as stop:  # argparse's own errors (a bad type, a value outside the choices)
            code = stop.code
        stderr = capsys.readouterr().err
        assert code == CLI_EXIT
        assert "Traceback" not in stderr
        message = stderr.splitlines()[-1]  # the one error line, after any progress bars of loading
        assert message.startswith("kangaroo-fast: error: ") or message.startswith("kangaroo-fast generate: error: ")
    else:
        with pytest.raises(case.error) as caught:
            case.run(ctx)
        message = str(caught.value)
    for name in case.names:
        assert name in message, f"{name!r} not in {message!r}"
    assert not (ctx.root / "code-ran").exists()  # no pickle ever ran its code


def test_a_bug_still_shows_its_traceback(ctx, monkeypatch):
    def broken_load(*args, **kwargs):
        raise RuntimeError("an internal error")

    monkeypatch.setattr(kf, "load", broken_load)
    with pytest.raises(RuntimeError, match="an internal error"):
        cli.main(["generate", "Hello", "--model", str(ctx.model_dir)])


def test_one_layer_model_generates_without_an_adapter():
    one_layer = kf.load(tiny_model("llama", 5, num_hidden_layers=1))
    out = one_layer.generate([4, 9, 17], max_new_tokens=4, speculate=False, eos_token_id=[])
    assert len(out.tokens) == 4
    with pytest.raises(ValueError, match="speculative decoding needs an adapter"):
        one_layer.generate([4, 9, 17], max_new_tokens=4)


@pytest.mark.parametrize("command", ["generate", "train", "bench", "tune", "vllm-config"])
def test_help_documents_every_flag_with_its_default(command, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main([command, "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    options = text[text.index("options:"):]
    # one block per flag: from its name at the start of a line to the next flag
    blocks = re.split(r"\n  (?=-)", options)[1:]
    flags = set(re.findall(r"\[(--[a-z-]+)", text[:text.index("options:")]))
    assert {block.split()[0].rstrip(",") for block in blocks} >= flags | {"-h"}
    for block in blocks:
        if block.startswith("-h"):
            continue
        described = " ".join(block.split())
        assert "default" in described or "(required)" in described, described
        assert "(default: None)" not in described, described
