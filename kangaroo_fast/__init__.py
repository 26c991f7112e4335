"""kangaroo_fast: lossless Kangaroo self-speculative decoding for HuggingFace Llama-family models."""
import importlib.util as _util
from pathlib import Path as _Path

# Installed, ``kernels/`` is the subpackage ``kangaroo_fast.kernels`` (setup.py's package_dir). Run from a source
# checkout that was never installed (a GPU image without pip), it sits beside this package: let it be found there.
_checkout = _Path(__file__).resolve().parent.parent
if _util.find_spec(__name__ + ".kernels") is None and (_checkout / "kernels" / "__init__.py").is_file():
    __path__.append(str(_checkout))
from .adapter import Adapter, AdapterConfig
from .api import GenerateOutput, KangarooModel, generate, load
from .config import DecodeSettings, ModelConfig
from .drafting import AdapterDrafter, ContextLookup, Drafter, FirstOf, HeadProposal, Proposal
from .engine import GenerationStats

__version__ = "0.1.0"
__all__ = ["Adapter", "AdapterConfig", "AdapterDrafter", "ContextLookup", "Drafter", "FirstOf", "HeadProposal",
           "Proposal", "DecodeSettings", "GenerateOutput", "GenerationStats", "KangarooModel",
           "ModelConfig", "generate", "load", "__version__"]
