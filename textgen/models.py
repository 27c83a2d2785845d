"""Model names -> model directories, and the process's device setting, for the MindFormers-style API.

There is no model hub: "gpt2" (and "default") name the model embedded in this repository, models/default;
anything else must be a model directory (config.json, weights, tokenizer files).
"""

from __future__ import annotations

import os
from pathlib import Path

import mindspore as ms

from model import GPT2LMHeadModel as _GPT2LMHeadModel

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
    """Select graph mode on `target` (default: $GPT2_DEVICE_TARGET or CPU) unless graph mode is already set."""
    from tools.training.runtime import setup_device

    if target is None and ms.get_context("mode") == ms.GRAPH_MODE:
        return
    setup_device(target or os.environ.get("GPT2_DEVICE_TARGET", "CPU"))


class GPT2LMHeadModel(_GPT2LMHeadModel):
    """model.GPT2LMHeadModel whose from_pretrained also accepts the embedded model's name ("gpt2")."""

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs) -> "GPT2LMHeadModel":
        ensure_device()
        return super().from_pretrained(resolve_model_dir(name_or_path), **kwargs)
