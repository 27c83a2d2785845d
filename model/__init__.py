"""GPT-2 on MindSpore: config, Cells with Hugging Face parameter names, compiled KV-cache inference, model dirs.

Knows tensors and MindSpore only (no HTTP, no asyncio, no torch).
"""

from .config import PRESETS, GPT2Config
from .gpt2 import GPT2LMHeadModel
from .inference import InferenceSession

__all__ = ["GPT2Config", "GPT2LMHeadModel", "InferenceSession", "PRESETS"]
