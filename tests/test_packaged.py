"""Compiled steps kept as AOTInductor packages (``packaged.py``): lossless against HF in float32, the same tokens as
the in-process compile in bfloat16, loaded (not compiled) by a later process, rebuilt when damaged, keyed by the
weights and dtype, and safe for two processes warming one cache at once."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kangaroo_fast
from kangaroo_fast import packaged
from kangaroo_fast.graphs import CompiledStep
from kangaroo_fast.packaged import PackagedStep
from conftest import hf_greedy, random_adapter, random_prompt, tiny_model

ROOT = Path(__file__).resolve().parents[1]
NEW_TOKENS = 16

# a later process: the same seeded model and adapter, its steps from the cache; prints the tokens and how each step
# came to be (built here or loaded)
CHILD = """
import json, sys, torch
sys.path.insert(0, sys.argv[2])
from conftest import random_adapter, random_prompt, tiny_model
import kangaroo_fast
dtype = getattr(torch, sys.argv[3])
model = tiny_model("llama", 12, num_hidden_layers=3)
adapter = random_adapter(model, 2, seed=8) if sys.argv[4] == "adapter" else None
km = kangaroo_fast.load(model.to(dtype), adapter=adapter, dtype=dtype, backend="inductor", step_cache=sys.argv[1])
km.warm_up()
ids = random_prompt(model.config.vocab_size, 9, 3)
out = {"vanilla": km.generate(ids, max_new_tokens=16, speculate=False, eos_token_id=[]).tokens}
if adapter is not None:
    out["kangaroo"] = km.generate(ids, max_new_tokens=16, threshold=0.0, max_draft_steps=3, eos_token_id=[]).tokens
out["steps"] = sorted((type(s).__name__, s.built, s.loaded) for s in km.engine.steps.graphs.values())
print(json.dumps(out))
"""


def child(cache: Path, dtype: str = "float32", adapter: str = "adapter", wait: bool = True):
    args = [sys.executable, "-c", CHILD, str(cache), str(ROOT / "tests"), dtype, adapter]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    return finish(proc) if wait else proc


def finish(proc) -> tuple[dict, str]:
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1]), err


def seeded(dtype=torch.float32):
    model = tiny_model("llama", 12, num_hidden_layers=3)
    return model, random_adapter(model, 2, seed=8), random_prompt(model.config.vocab_size, 9, 3)


def test_packages_are_lossless_and_a_later_process_loads_them(tmp_path, capsys):
    cache = tmp_path / "steps"
    model, adapter, ids = seeded()
    ref = hf_greedy(model, ids, NEW_TOKENS, eos_token_id=[])
    km = kangaroo_fast.load(model, adapter=adapter, dtype=torch.float32, backend="inductor", step_cache=cache)
    km.warm_up()  # every kind the later process warms up
    kinds = set(km.engine.steps.graphs)
    assert km.generate(ids, max_new_tokens=NEW_TOKENS, speculate=False, eos_token_id=[]).tokens == ref
    out = km.generate(ids, max_new_tokens=NEW_TOKENS, threshold=0.0, max_draft_steps=3, eos_token_id=[])
    assert out.tokens == ref and out.stats.draft_steps > 0
    assert set(km.engine.steps.graphs) == kinds  # nothing is built after warm_up
    steps = list(km.engine.steps.graphs.values())
    assert steps and all(isinstance(s, PackagedStep) and s.built and s.fallback is None for s in steps)
    assert capsys.readouterr().err.count("into a package") == len(steps)
    prompts = [random_prompt(model.config.vocab_size, n, 40 + n) for n in (3, 14)] + [ids]
    refs = [hf_greedy(model, p, NEW_TOKENS, eos_token_id=[]) for p in prompts]
    for speculate in (False, True):  # batches: packages with a symbolic batch
        outs = km.generate([p[0] for p in prompts], max_new_tokens=NEW_TOKENS, speculate=speculate, threshold=0.0,
                           max_draft_steps=3, eos_token_id=[])
        assert [o.tokens for o in outs] == refs, speculate
    assert any(key[1] == "B>1" for key in km.engine.steps.graphs)

    later, err = child(cache)
    assert later["vanilla"] == ref and later["kangaroo"] == ref
    assert {tuple(s) for s in later["steps"]} == {("PackagedStep", False, True)}  # loaded, none compiled
    assert "compiling" not in err

    # a damaged package: the next process says so once, builds that step again and decodes the same
    vanilla = next(p for p in cache.rglob("*.pt2") if p.name.startswith("verify-1-1-0."))
    vanilla.write_bytes(vanilla.read_bytes()[:4096])
    again, err = child(cache)
    assert again["vanilla"] == ref and again["kangaroo"] == ref
    assert err.count("is unreadable") == 1 and err.count("into a package") == 1
    assert sorted(map(tuple, again["steps"])).count(("PackagedStep", True, False)) == 1


def test_bf16_packages_decode_as_the_in_process_compile(tmp_path):
    model, adapter, ids = seeded()
    model = model.to(torch.bfloat16)
    kwargs = dict(adapter=adapter, dtype=torch.bfloat16, backend="inductor")
    compiled = kangaroo_fast.load(model, **kwargs, step_cache=False)
    want = [compiled.generate(ids, max_new_tokens=NEW_TOKENS, speculate=s, threshold=0.0, max_draft_steps=3,
                              eos_token_id=[]).tokens for s in (False, True)]
    assert all(isinstance(s, CompiledStep) for s in compiled.engine.steps.graphs.values())
    got, _err = child(tmp_path / "steps", "bfloat16")
    assert [got["vanilla"], got["kangaroo"]] == want


def test_keys_change_with_the_adapter_and_the_dtype(tmp_path):
    model, adapter, _ids = seeded()
    load = lambda m, a, dtype: kangaroo_fast.load(m, adapter=a, dtype=dtype, backend="inductor",  # noqa: E731
                                                  step_cache=tmp_path).engine
    base = packaged.weights_digest(load(model, adapter, torch.float32))
    assert packaged.weights_digest(load(model, adapter, torch.float32)) == base  # the same weights: the same key
    other = random_adapter(model, 2, seed=9)
    assert packaged.weights_digest(load(model, other, torch.float32)) != base
    assert packaged.weights_digest(load(model, adapter, torch.bfloat16)) != base
    assert packaged.weights_digest(load(model, None, torch.float32)) != base


def test_two_processes_warming_one_cache_at_once(tmp_path):
    cache = tmp_path / "steps"
    model, _adapter, ids = seeded()
    ref = hf_greedy(model, ids, NEW_TOKENS, eos_token_id=[])
    procs = [child(cache, adapter="none", wait=False) for _ in range(2)]
    for proc in procs:
        out, _err = finish(proc)
        assert out["vanilla"] == ref
    later, err = child(cache, adapter="none")
    assert later["vanilla"] == ref and {tuple(s) for s in later["steps"]} == {("PackagedStep", False, True)}
    assert "unreadable" not in err


def test_step_cache_argument_is_checked():
    model, _adapter, _ids = seeded()
    with pytest.raises(TypeError, match="step_cache must be"):
        kangaroo_fast.load(model, dtype=torch.float32, backend="inductor", step_cache=3)
