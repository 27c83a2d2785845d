"""Model names -> model directories, and the process's device setting, for the MindFormers-style API.

There is no model hub: "gpt2" (and "default") name the model embedded in this repository, models/default;
anything else must be a model directory (config.json, weights, tokenizer files).
"""

from __future__ import annotations

import os
from pathlib import Path

import mindspore as ms

from model.checkpoint import load_model_dir, save_model_dir
from model.gpt2 import GPT2LMHeadModel as _GPT2LMHeadModel
from model.inference import generate
from model.runtime import set_device

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "default"
# Names that mean the embedded model. MindFormers' 'gpt2' is the 124M model; here it is the small default one.
EMBEDDED_NAMES = ("gpt2", "default")


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A model directory for a name ("gpt2") or a path; a clear FileNotFoundError otherwise."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if str(name_or_path) in EMBEDDED_NAMES:
        if not (DEFAULT_MODEL_DIR / "config.json").is_file():
            raise FileNotFoundError(f"the embedded default model is missing from {DEFAULT_MODEL_DIR}")
        return DEFAULT_MODEL_DIR
    raise FileNotFoundError(
        f"model {str(name_or_path)!r} is neither a model directory nor an embedded model name "
        f"({', '.join(map(repr, EMBEDDED_NAMES))} = {DEFAULT_MODEL_DIR}); models are not downloaded: "
        "convert Hugging Face weights with tools/convert_weight.py or train one with tools/train.py"
    )


def ensure_device(target: str | None = None) -> None:
    """`set_device(target)` (default: $GPT2_DEVICE_TARGET or CPU) unless graph mode is already set and no target
    is named: a caller who chose the device first keeps it."""
    if target is None and ms.get_context("mode") == ms.GRAPH_MODE:
        return
    set_device(target or os.environ.get("GPT2_DEVICE_TARGET", "CPU"))


class GPT2LMHeadModel(_GPT2LMHeadModel):
    """model.GPT2LMHeadModel with MindFormers' methods: from_pretrained (a model directory or the embedded model's
    name, "gpt2"), save_pretrained and greedy generate."""

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, compute_dtype="float32",
                        quantize: str | None = None) -> "GPT2LMHeadModel":
        """quantize="int8": generate (and pipelines over this model) run int8 weights with per-row scales
        (model.quantize), quantized when the first generation builds its session; a quantized directory is run
        int8 whatever this says (its stored weights as they are)."""
        if quantize not in (None, "int8"):
            raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
        ensure_device()
        model = load_model_dir(resolve_model_dir(name_or_path), compute_dtype=compute_dtype, cls=cls)
        model.quantize = "int8" if quantize or model.int8_weights is not None else None
        return model

    def save_pretrained(self, path: str | os.PathLike, *, weights_format: str = "safetensors",
                        tokenizer_dir: str | None = None) -> None:
        """Write a model directory atomically (config.json, weights, tokenizer files)."""
        save_model_dir(self, path, weights_format=weights_format, tokenizer_dir=tokenizer_dir)

    def generate(self, prompt_ids, max_new_tokens: int, *, eos_token_id: int | None = None):
        """Greedy continuation of one prompt (list[int]) or several; see model.inference.generate."""
        return generate(self, prompt_ids, max_new_tokens, eos_token_id=eos_token_id)
