"""The package imports from a source checkout that was never installed (the GPU image has no pip)."""
import site
import subprocess
import sys
from pathlib import Path

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
