"""kangaroo_fast: lossless Kangaroo self-speculative decoding for HuggingFace Llama-family models."""
from .adapter import Adapter, AdapterConfig
from .api import GenerateOutput, KangarooModel, generate, load
from .config import DecodeSettings, ModelConfig
from .engine import GenerationStats

__version__ = "0.1.0"
__all__ = ["Adapter", "AdapterConfig", "DecodeSettings", "GenerateOutput", "GenerationStats", "KangarooModel",
           "ModelConfig", "generate", "load", "__version__"]
