"""The official Kangaroo adapter checkpoint format: save/load round trips and clear errors on bad checkpoints."""
from __future__ import annotations

import json

import pytest
import torch

import kangaroo_fast
from kangaroo_fast import Adapter, AdapterConfig, ModelConfig
from kangaroo_fast.adapter import MLP_KEYS, WEIGHT_KEYS
from kangaroo_fast.train.data import forward_states

from conftest import random_adapter, random_prompt, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2", 7)


@pytest.fixture(scope="module")
def model_config(model):
    return ModelConfig.from_hf(model.config)


def _assert_same_adapter(a: Adapter, b: Adapter) -> None:
    assert a.config == b.config
    sa, sb = a.official_state_dict(), b.official_state_dict()
    keys = WEIGHT_KEYS + (MLP_KEYS if a.config.mlp_size else ())
    assert list(sa) == list(keys) == list(sb)
    for key in keys:
        assert sa[key].dtype == sb[key].dtype
        assert torch.equal(sa[key], sb[key]), key
    if a.draft_vocab is None:
        assert b.draft_vocab is None
    else:
        assert b.draft_vocab is not None
        assert b.draft_vocab.dtype == torch.int64
        assert torch.equal(a.draft_vocab, b.draft_vocab)


@pytest.mark.parametrize("with_vocab", [False, True])
def test_save_load_round_trip(tmp_path, model, model_config, with_vocab):
    gen = torch.Generator().manual_seed(3)
    vocab = torch.randperm(model_config.vocab_size, generator=gen)[:41] if with_vocab else None
    adapter = random_adapter(model, 3, seed=4, draft_vocab=vocab, threshold=0.35, max_draft_steps=5, lookup=2)
    path = adapter.save(tmp_path / "nested" / "adapter")
    assert path == tmp_path / "nested" / "adapter"
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert (path / "draft_vocab.safetensors").is_file() == with_vocab
    for loaded in (Adapter.load(path), Adapter.load(path, model_config), Adapter.load(str(path))):
        _assert_same_adapter(adapter, loaded)
    data = json.loads((path / "config.json").read_text())
    assert data["kangaroo"] == {"exit_layer": 3, "threshold": 0.35, "max_draft_steps": 5, "lookup": 2}
    assert data["hidden_size"] == model_config.hidden_size


def test_round_trip_keeps_extra_settings_and_generation(tmp_path, model, model_config):
    config = AdapterConfig.for_model(model_config, exit_layer=2, threshold=0.5, max_draft_steps=3,
                                     extra={"trained_on": "random", "steps": 17})
    adapter = Adapter(config)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    adapter.save(tmp_path)
    loaded = Adapter.load(tmp_path, model_config)
    assert loaded.config.extra == {"trained_on": "random", "steps": 17}
    _assert_same_adapter(adapter, loaded)
    # the loaded adapter drafts exactly as the original one: identical statistics
    ids = random_prompt(model_config.vocab_size, 6, 8)
    a = kangaroo_fast.load(model, adapter=adapter).generate(ids, max_new_tokens=15)
    b = kangaroo_fast.load(model, adapter=str(tmp_path)).generate(ids, max_new_tokens=15)
    assert a.tokens == b.tokens
    assert a.stats.drafted_at == b.stats.drafted_at and a.stats.accepted_at == b.stats.accepted_at
    assert a.stats.draft_steps == b.stats.draft_steps


def test_pytorch_model_bin_loads(tmp_path, model, model_config):
    adapter = random_adapter(model, 2, seed=9)
    state = {k: v.detach().clone() for k, v in adapter.official_state_dict().items()}
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(adapter.config.to_json()))
    loaded = Adapter.load(tmp_path, model_config)
    _assert_same_adapter(adapter, loaded)


def test_official_config_without_kangaroo_section(tmp_path, model, model_config):
    """An official checkpoint's LlamaConfig-style config.json (no kangaroo section, no head_dim, no kv heads)."""
    adapter = random_adapter(model, 2, seed=10)
    torch.save({k: v.detach().clone() for k, v in adapter.official_state_dict().items()},
               tmp_path / "pytorch_model.bin")
    data = adapter.config.to_json()
    for key in ("kangaroo", "head_dim"):
        del data[key]
    (tmp_path / "config.json").write_text(json.dumps(data))
    loaded = Adapter.load(tmp_path, model_config)
    assert loaded.config.head_dim == model_config.head_dim
    assert loaded.config.exit_layer == AdapterConfig.__dataclass_fields__["exit_layer"].default
    for key in WEIGHT_KEYS:
        assert torch.equal(loaded.official_state_dict()[key], adapter.official_state_dict()[key])


def test_safetensors_preferred_over_bin(tmp_path, model, model_config):
    first = random_adapter(model, 2, seed=11)
    second = random_adapter(model, 2, seed=12)
    first.save(tmp_path)
    torch.save({k: v.detach().clone() for k, v in second.official_state_dict().items()},
               tmp_path / "pytorch_model.bin")
    _assert_same_adapter(first, Adapter.load(tmp_path, model_config))


# ---- bad checkpoints ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("missing", ["layers.0.self_attn.k_proj.weight", "norm.weight"])
def test_missing_key(tmp_path, model, model_config, missing):
    from safetensors.torch import save_file

    adapter = random_adapter(model, 2, seed=13)
    adapter.save(tmp_path)
    state = {k: v.detach().contiguous() for k, v in adapter.official_state_dict().items() if k != missing}
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=f"lacks {missing}"):
        Adapter.load(tmp_path, model_config)


def test_missing_key_in_bin(tmp_path, model, model_config):
    adapter = random_adapter(model, 2, seed=14)
    state = {k: v.detach().clone() for k, v in adapter.official_state_dict().items()}
    del state["layers.0.input_layernorm.weight"]
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(adapter.config.to_json()))
    with pytest.raises(ValueError, match="lacks layers.0.input_layernorm.weight"):
        Adapter.load(tmp_path, model_config)


def test_wrong_shape(tmp_path, model, model_config):
    from safetensors.torch import save_file

    adapter = random_adapter(model, 2, seed=15)
    adapter.save(tmp_path)
    state = {k: v.detach().contiguous() for k, v in adapter.official_state_dict().items()}
    h = model_config.hidden_size
    state["layers.0.self_attn.v_proj.weight"] = torch.randn(model_config.kv_size + 3, h)
    save_file(state, str(tmp_path / "model.safetensors"))
    expected = f"layers.0.self_attn.v_proj.weight has shape \\({model_config.kv_size + 3}, {h}\\)"
    with pytest.raises(ValueError, match=expected):
        Adapter.load(tmp_path, model_config)


def test_hidden_size_mismatch_names_both_values(tmp_path, model_config):
    other = tiny_model("qwen2", 7, hidden_size=60)  # 6 heads of 10 instead of 72 = 6 x 12
    random_adapter(other, 2, seed=16).save(tmp_path)
    with pytest.raises(ValueError, match=r"hidden_size=60.*hidden_size=72"):
        Adapter.load(tmp_path, model_config)
    with pytest.raises(ValueError, match=r"hidden_size=60.*hidden_size=72"):
        kangaroo_fast.load(tiny_model("qwen2", 7), adapter=tmp_path)


def test_vocab_mismatch_names_both_values(tmp_path, model, model_config):
    other = tiny_model("qwen2", 7, vocab_size=113)
    random_adapter(other, 2, seed=17).save(tmp_path)
    with pytest.raises(ValueError, match=r"vocab_size=113.*vocab_size=97"):
        Adapter.load(tmp_path, model_config)
    with pytest.raises(ValueError, match=r"vocab_size=113.*vocab_size=97"):
        kangaroo_fast.KangarooModel(model, adapter=random_adapter(other, 2, seed=18))


def test_exit_layer_out_of_range_in_config(tmp_path, model, model_config):
    random_adapter(model, 2, seed=19).save(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["kangaroo"]["exit_layer"] = model_config.num_layers
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"exit_layer={model_config.num_layers} is outside 1..4"):
        Adapter.load(tmp_path, model_config)


def test_missing_directory(tmp_path, model_config):
    path = tmp_path / "no_such_adapter"
    with pytest.raises(FileNotFoundError, match="no_such_adapter.*has no config.json"):
        Adapter.load(path, model_config)


def test_missing_config_json(tmp_path, model, model_config):
    random_adapter(model, 2, seed=20).save(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        Adapter.load(tmp_path, model_config)


def test_missing_weights_file(tmp_path, model, model_config):
    random_adapter(model, 2, seed=21).save(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor pytorch_model.bin"):
        Adapter.load(tmp_path, model_config)


@pytest.mark.parametrize("key", ["hidden_size", "num_attention_heads", "vocab_size"])
def test_config_missing_key(tmp_path, model, model_config, key):
    random_adapter(model, 2, seed=22).save(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    del data[key]
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"lacks the key '{key}'"):
        Adapter.load(tmp_path, model_config)


@pytest.mark.parametrize("vocab,message", [
    (torch.tensor([3, 97]), "outside 0..96"),
    (torch.tensor([-1, 4]), "outside 0..96"),
    (torch.tensor([], dtype=torch.int64), "non-empty 1-D"),
    (torch.tensor([[1, 2]]), "non-empty 1-D"),
])
def test_bad_draft_vocab(model_config, vocab, message):
    with pytest.raises(ValueError, match=message):
        Adapter(AdapterConfig.for_model(model_config, exit_layer=2), draft_vocab=vocab)


def test_interrupted_save_leaves_the_previous_adapter_whole(tmp_path, model, model_config, monkeypatch):
    import safetensors.torch

    path = tmp_path / "adapter"
    old = random_adapter(model, 2, seed=23, draft_vocab=torch.arange(0, 90, 3))
    old.save(path, extra_files={"recipe.json": "{}\n"})
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    real_save_file = safetensors.torch.save_file
    calls = []

    def save_then_fail(tensors, filename, metadata=None):  # the weights written, then interrupted
        calls.append(filename)
        real_save_file(tensors, filename, metadata=metadata)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_fail)
    with pytest.raises(KeyboardInterrupt):
        random_adapter(model, 3, seed=24, draft_vocab=torch.arange(5, 60)).save(path)
    assert len(calls) == 2
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no partial folder left behind
    _assert_same_adapter(old, Adapter.load(path, model_config))
    monkeypatch.undo()
    new = random_adapter(model, 3, seed=24)
    new.save(path)
    _assert_same_adapter(new, Adapter.load(path, model_config))
    assert not (path / "recipe.json").exists() and not (path / "draft_vocab.safetensors").exists()


def test_adapter_with_mlp_round_trip_and_missing_mlp_key(tmp_path, model, model_config):
    """An adapter with an MLP after its attention saves its size in the kangaroo section and its weights under
    HF Llama's MLP names beside the official keys; it loads back equal, decodes losslessly, and a checkpoint
    lacking an MLP tensor its config asks for names it."""
    from safetensors.torch import load_file, save_file

    adapter = random_adapter(model, 2, seed=9, mlp_size=20, threshold=0.0, max_draft_steps=3)
    path = adapter.save(tmp_path / "mlp")
    data = json.loads((path / "config.json").read_text())
    assert data["kangaroo"]["mlp_size"] == 20
    loaded = Adapter.load(path, model_config)
    _assert_same_adapter(adapter, loaded)
    prompt = random_prompt(model.config.vocab_size, 9, seed=2)
    reference = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, prompt.shape[1]:].tolist()
    out = kangaroo_fast.load(model, adapter=loaded).generate(prompt, max_new_tokens=12, eos_token_id=[])
    assert out.tokens == reference and out.stats.draft_steps > 0
    state = load_file(str(path / "model.safetensors"))
    del state["layers.0.mlp.down_proj.weight"]
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match="layers.0.mlp.down_proj.weight"):
        Adapter.load(path)
    data["kangaroo"]["mlp_size"] = -1
    (path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="mlp_size=-1"):
        Adapter.load(path)


def test_engine_runs_the_adapters_mlp_as_training_does(model):
    """The engine's adapter block (a prefill's states through ``Engine._adapter``) equals ``Adapter.forward``,
    which training uses, for an adapter with an MLP; the MLP changes the output (it is not skipped)."""
    adapter = random_adapter(model, 2, seed=11, mlp_size=20)
    engine = kangaroo_fast.load(model, adapter=adapter).engine
    ids = random_prompt(model.config.vocab_size, 13, seed=5)
    states, _ = forward_states(engine, ids, [2])
    hidden = states[2]
    cos, sin = engine.w.rope_cos[:13], engine.w.rope_sin[:13]
    expected = adapter(hidden, cos, sin)
    eps = adapter.config.rms_norm_eps
    got = engine.ops.rms_norm(engine._adapter(hidden, 0), engine.a.norm, eps)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    adapter.config.mlp_size = 0  # the same weights read without their MLP
    assert not torch.allclose(adapter(hidden, cos, sin), expected, atol=1e-2)
