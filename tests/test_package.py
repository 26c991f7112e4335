"""The package imports from a source checkout that was never installed (the GPU image has no pip), and its wheel
carries everything it reads (prompt set, instruction word lists, adapter, kernels) and none of the checkout's tooling."""
import importlib.util
import os
import re
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
sys.path[:0] = [sys.argv[1], *sys.argv[2:]]  # the checkout first; site-packages without their .pth files
import kangaroo_fast, kangaroo_fast.kernels
assert kangaroo_fast.__file__.startswith(sys.argv[1]), kangaroo_fast.__file__
assert kangaroo_fast.kernels.__file__.startswith(sys.argv[1] + "/kernels"), kangaroo_fast.kernels.__file__
assert not any("editable" in type(finder).__module__ for finder in sys.meta_path)
"""


def test_kernels_subpackage_found_in_an_uninstalled_checkout():
    # -S: no site module, so no .pth file runs and the editable install's finder is absent
    result = subprocess.run([sys.executable, "-S", "-c", SCRIPT, str(ROOT), *site.getsitepackages()],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


# ---- the wheel ------------------------------------------------------------------------------------------------------
# What a source checkout has that a wheel must not carry: the checkout's tooling, tests, results and build leftovers.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", ".ci", "build", "dist", "*.egg-info", "__pycache__",
                                    ".pytest_cache", ".benchmarks", "results", ".whl", ".gl", "artifacts")

INSTALLED = """
import sys
site = sys.argv[1]
import kangaroo_fast, kangaroo_fast.kernels
from kangaroo_fast import benchmark
from kangaroo_fast.api import DEFAULT_ADAPTER_DIR
from kangaroo_fast.train.instructions import BENCH_PATH, WORDS_PATH, training_instructions
for path in (kangaroo_fast.__file__, kangaroo_fast.kernels.__file__, benchmark.DEFAULT_PROMPTS, BENCH_PATH,
             WORDS_PATH, DEFAULT_ADAPTER_DIR):
    assert str(path).startswith(site), path
samples = benchmark.load_prompts()
assert len({s.category for s in samples}) == 6, samples
assert len(training_instructions(100)) == 100
assert (DEFAULT_ADAPTER_DIR / "model.safetensors").is_file()
assert not [m for m in sys.modules if m == "bench" or m.startswith("bench.") or m in ("report", "harness")]
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of a copy of this checkout (no network: setuptools from this environment, no dependencies)."""
    for needed in ("pip", "setuptools"):  # looked up, not imported: setuptools would patch distutils in here
        if importlib.util.find_spec(needed) is None:
            pytest.skip(f"no {needed} in this environment")
    source = tmp_path_factory.mktemp("checkout") / "kangaroo_fast"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                             "-q", "-w", str(out), str(source)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (path,) = out.glob("kangaroo_fast-*.whl")
    return path


def test_wheel_carries_the_data_and_no_checkout_tooling(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {name.split("/")[0] for name in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"kangaroo_fast"}  # no top-level kernels/bench/tests
    expected = {"kangaroo_fast/data/prompts.jsonl", "kangaroo_fast/train/instructions.json",
                "kangaroo_fast/train/default_recipe.json"}
    expected |= {f"kangaroo_fast/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}
    expected |= {f"kangaroo_fast/adapters/{p.relative_to(ROOT / 'kangaroo_fast' / 'adapters')}"
                 for p in (ROOT / "kangaroo_fast" / "adapters").rglob("*") if p.is_file()}
    assert expected <= names, sorted(expected - names)
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read("kangaroo_fast/data/prompts.jsonl") == \
            (ROOT / "kangaroo_fast" / "data" / "prompts.jsonl").read_bytes()
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "kangaroo-fast = kangaroo_fast.cli:main" in archive.read(entry_points).decode()


def test_unpacked_wheel_finds_its_data_outside_the_checkout(wheel, tmp_path):
    site_dir = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site_dir)
    result = subprocess.run([sys.executable, "-c", INSTALLED, str(site_dir)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(site_dir)})
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_library_imports_nothing_from_the_checkout_tooling():
    for path in (ROOT / "kangaroo_fast").rglob("*.py"):
        source = path.read_text(encoding="utf-8")
        assert not re.search(r"^\s*(from|import)\s+(bench|report|harness)\b", source, re.MULTILINE), path
