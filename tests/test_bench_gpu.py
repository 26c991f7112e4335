"""bench/gpu.py's CPU-checkable parts: argument handling, the case list with its byte counts, the JSON writer."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu.py"


@pytest.fixture(scope="module")
def gpu_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_plan_lists_every_kernel_per_model_and_row_count(gpu_bench, tmp_path):
    out = tmp_path / "gpu.json"
    assert gpu_bench.main(["--output", str(out), "--plan", "--context", "1024"]) == 0
    result = json.loads(out.read_text())
    assert result["timed"] is False and result["copy_gbs"] is None and result["context"] == 1024
    assert set(result["machine"]) >= {"python", "torch", "triton", "commit", "gpu"}
    kernels = {(c["kernel"], c["model"], c["rows"]) for c in result["cases"]}
    assert len(kernels) == len(result["cases"]) == 24
    for model in ("smollm2-135m", "vicuna-7b"):
        for rows in (1, 7):
            for kernel in ("qkv_rope_cache", "decode_attention", "o_proj_residual", "norm_gate_up_silu",
                           "down_residual"):
                assert (kernel, model, rows) in kernels
        assert ("draft_head", model, 1) in kernels and ("verify_head", model, 7) in kernels
    vicuna_down = next(c for c in result["cases"] if c["kernel"] == "down_residual" and c["model"] == "vicuna-7b")
    assert vicuna_down["bytes_moved"] >= 4096 * 11008 * 2  # at least the bf16 weight
    attention = next(c for c in result["cases"] if c["kernel"] == "decode_attention" and c["model"] == "vicuna-7b")
    assert attention["bytes_moved"] >= 2 * 32 * 1024 * 128 * 2  # both caches, every position
    steps = {(s["step"], s["model"]): s for s in result["steps"]}
    assert set(steps) == {(step, model) for step in ("draft", "verify") for model in ("smollm2-135m", "vicuna-7b")}
    # REFERENCE.md: a 7B draft step reads about 1.2 GB, a 7B forward about 13.2 GB (bf16 weights)
    assert 1.0e9 < steps["draft", "vicuna-7b"]["bytes_floor"] < 1.4e9
    assert 12.0e9 < steps["verify", "vicuna-7b"]["bytes_floor"] < 13.6e9
    assert steps["verify", "vicuna-7b"]["layers"] == 30 and steps["draft", "vicuna-7b"]["rows"] == 1
    assert result["end_to_end"] is None  # not timed: nothing ran


def test_bad_arguments_name_the_value(gpu_bench, tmp_path):
    with pytest.raises(SystemExit):
        gpu_bench.main(["--output", str(tmp_path / "x.json"), "--context", "4"])
    with pytest.raises(SystemExit):
        gpu_bench.main(["--output", str(tmp_path / "x.json"), "--models", "gpt-9"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU this would time every kernel")
def test_without_cuda_only_the_plan_is_written(gpu_bench, tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert gpu_bench.main(["--output", str(out), "--models", "smollm2-135m"]) == 0
    assert "no CUDA device" in capsys.readouterr().err
    assert json.loads(out.read_text())["timed"] is False
