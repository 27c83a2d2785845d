"""The MindFormers GPT-2 Python API on this project's packages.

    from textgen import GPT2LMHeadModel, GPT2Tokenizer, Trainer, pipeline

`GPT2LMHeadModel` is model.GPT2LMHeadModel whose from_pretrained also takes "gpt2" (the embedded model in
models/default); `GPT2Tokenizer` is tokenizer.GPT2Tokenizer. Importing this package selects nothing; the first
model load selects graph mode on $GPT2_DEVICE_TARGET (default CPU) unless the caller already chose.
"""

from model import GPT2Config, InferenceSession
from tokenizer import GPT2Tokenizer

from .models import DEFAULT_MODEL_DIR, GPT2LMHeadModel, ensure_device, resolve_model_dir
from .pipeline import TextGenerationPipeline, pipeline
from .trainer import Trainer

__all__ = [
    "DEFAULT_MODEL_DIR",
    "GPT2Config",
    "GPT2LMHeadModel",
    "GPT2Tokenizer",
    "InferenceSession",
    "TextGenerationPipeline",
    "Trainer",
    "ensure_device",
    "pipeline",
    "resolve_model_dir",
]
