"""GPT-2 on MindSpore: config, Cells with Hugging Face parameter names, compiled KV-cache inference, model dirs.

Knows tensors and MindSpore only (no HTTP, no asyncio, no torch). The model and the session are imported on first
use, so that the numpy-only modules (`model.sampler`, `model.atomic_write`, `model.config`) import without
MindSpore: the serving engine's scheduler and tests, the benchmark helpers and the training checkpoints use them.
"""

from .config import PRESETS, GPT2Config

__all__ = ["GPT2Config", "GPT2LMHeadModel", "InferenceSession", "PRESETS"]


def __getattr__(name: str):
    if name == "GPT2LMHeadModel":
        from .gpt2 import GPT2LMHeadModel

        return GPT2LMHeadModel
    if name == "InferenceSession":
        from .inference import InferenceSession

        return InferenceSession
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
