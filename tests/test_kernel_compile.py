"""Every kernel compiles for sm_80 and sm_90 at the block sizes its launcher picks for SmolLM2-135M and Vicuna-7B,
without spilling registers and within the shared memory of one block (no GPU needed: triton compiles to cubin and
triton's cuobjdump reads the resource usage).

The compile runs in a subprocess without TRITON_INTERPRET (conftest sets it on machines without CUDA, and the
interpreter has no compiler). The per-kernel registers and shared memory land in a JSON in the test's
temporary directory and in the test's recorded properties.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def compile_report(tmp_path_factory):
    path = tmp_path_factory.mktemp("compile") / "kernel_resources.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "kangaroo_fast.kernels.compile_check", "--json", str(path)],
                         env=env, capture_output=True, text=True, timeout=900)
    assert path.exists(), f"compile check wrote no report:\n{run.stderr[-3000:]}"
    return json.loads(path.read_text()), run


def test_every_kernel_compiles_without_spills_within_shared_memory(compile_report, record_property):
    report, run = compile_report
    rows = report["kernels"]
    for r in rows:
        record_property(f"{r['kernel']}/{r['model']}/{r['case']}/sm_{r['arch']}",
                        f"regs={r['registers']} shared={r['shared_bytes']}B warps={r['num_warps']}")
    problems = [f"{r['kernel']} {r['model']}/{r['case']} sm_{r['arch']}: {r['problems']}" for r in rows
                if r["problems"]]
    assert not problems, "\n".join(problems)
    assert run.returncode == 0, run.stderr[-3000:]


def test_report_covers_every_kernel_on_both_architectures(compile_report):
    rows = compile_report[0]["kernels"]
    kernels = {"_rms_norm_linear_kernel", "_qkv_rope_cache_kernel", "_decode_attention_kernel", "_combine_kernel",
               "_lm_head_partials_kernel", "_draft_head_kernel", "_verify_head_kernel"}
    for arch in (80, 90):
        assert {r["kernel"] for r in rows if r["arch"] == arch} == kernels
        assert {r["model"] for r in rows if r["arch"] == arch} == {"smollm2-135m", "vicuna-7b"}
    assert all(r["registers"] > 0 for r in rows)


def test_resource_limits_are_enforced():
    """The check itself flags a spill and an over-large shared allocation (it can fail)."""
    from kangaroo_fast.kernels.compile_check import SHARED_LIMIT, Resources

    fine = Resources("k", "m", "c", 90, 4, 128, SHARED_LIMIT[90], 0, 0, {})
    assert fine.problems == []
    assert Resources("k", "m", "c", 80, 4, 255, SHARED_LIMIT[90], 0, 0, {}).problems == [
        f"shared memory {SHARED_LIMIT[90]} B > {SHARED_LIMIT[80]} B"]
    assert Resources("k", "m", "c", 90, 4, 255, 0, 8, 16, {}).problems == ["spills: 8 local / 16 stack bytes"]
