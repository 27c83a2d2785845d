"""GPT-2 hyper-parameters, read from and written to Hugging Face `config.json` keys.

Knows the architecture's shape only: nothing about devices, dtypes or MindSpore (those are runtime settings,
see `model.runtime`). Unknown keys of a Hugging Face config are kept verbatim in `extra` and written back.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

# Activations accepted from a Hugging Face config. "gelu_new" and "gelu_pytorch_tanh" are the same tanh
# approximation (GPT-2's own); "gelu" is the exact erf form some fine-tunes use.
SUPPORTED_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu")


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 50257  # byte-level BPE vocabulary, <|endoftext|> = 50256
    n_positions: int = 1024  # longest sequence (learned position table size)
    n_embd: int = 768  # hidden size d
    n_layer: int = 12
    n_head: int = 12  # head size = n_embd // n_head
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1  # dropouts act only in training mode
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True  # divide scores by sqrt(head size)
    scale_attn_by_inverse_layer_idx: bool = False  # also divide by (layer index + 1)
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    # Hugging Face keys this project does not use (architectures, task_specific_params, ...): kept for writing.
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name != "extra":
                _check_type(f.name, getattr(self, f.name))
        for name in _FLOAT_FIELDS:
            # Frozen: normalise ints read from JSON (0 for 0.0) so equality and writing are stable.
            object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GPT2Config.{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_inner is not None and self.n_inner <= 0:
            raise ValueError(f"GPT2Config.n_inner must be positive or None, got {self.n_inner}")
        if self.activation_function not in SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"activation_function {self.activation_function!r} is not supported; "
                f"use one of {', '.join(SUPPORTED_ACTIVATIONS)}"
            )
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"GPT2Config.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.layer_norm_epsilon <= 0:
            raise ValueError(f"layer_norm_epsilon must be positive, got {self.layer_norm_epsilon}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def seq_length(self) -> int:
        # MindFormers' name for the context length; its examples pad to `model.config.seq_length`.
        return self.n_positions

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    # ---- presets -------------------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "GPT2Config":
        """The published GPT-2 sizes by exact name; keyword overrides replace single fields."""
        if name not in PRESETS:
            raise ValueError(f"unknown GPT-2 preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    # ---- Hugging Face config.json --------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPT2Config":
        if not isinstance(d, dict):
            raise ValueError(f"a GPT-2 config must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        model_type = d.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ValueError(f"config model_type is {model_type!r}, expected 'gpt2'")
        if d.get("tie_word_embeddings", True) is not True:
            raise ValueError("tie_word_embeddings=false is not supported: the LM head is tied to wte")
        # Legacy key of old GPT-2 configs; it always equals n_positions there.
        n_ctx = d.pop("n_ctx", None)
        if n_ctx is not None and "n_positions" in d and n_ctx != d["n_positions"]:
            raise ValueError(f"config n_ctx ({n_ctx}) differs from n_positions ({d['n_positions']})")
        if n_ctx is not None and "n_positions" not in d:
            d["n_positions"] = n_ctx
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: d.pop(k) for k in list(d) if k in names}
        if n_ctx is not None:
            d["n_ctx"] = n_ctx
        return cls(**known, extra=d)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}
        out.update(self.extra)
        for f in dataclasses.fields(self):
            if f.name != "extra":
                out[f.name] = getattr(self, f.name)
        out["tie_word_embeddings"] = True
        return out

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "GPT2Config":
        """Read a `config.json` file, or the one inside a model directory."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"no GPT-2 config at {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    def to_json(self, path: str | os.PathLike) -> None:
        """Write `config.json` (a file path, or a directory to write `config.json` into)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "activation_function": (str,),
    "scale_attn_weights": (bool,),
    "scale_attn_by_inverse_layer_idx": (bool,),
}
_FLOAT_FIELDS = {"resid_pdrop", "embd_pdrop", "attn_pdrop", "layer_norm_epsilon", "initializer_range"}


def _check_type(name: str, value: Any) -> None:
    if name in _FIELD_TYPES:
        ok = isinstance(value, _FIELD_TYPES[name])
        want = _FIELD_TYPES[name][0].__name__
    elif name in _FLOAT_FIELDS:
        # JSON writes 0.0 as 0 sometimes: an int is a fine float, a bool is not.
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        want = "number"
    elif name == "n_inner":
        ok = value is None or (isinstance(value, int) and not isinstance(value, bool))
        want = "int or null"
    else:
        ok = isinstance(value, int) and not isinstance(value, bool)
        want = "int"
    if not ok:
        raise TypeError(f"GPT2Config.{name} must be {want}, got {value!r} ({type(value).__name__})")


PRESETS: dict[str, GPT2Config] = {
    "gpt2": GPT2Config(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": GPT2Config(n_layer=24, n_head=16, n_embd=1024),  # 355M
    "gpt2-large": GPT2Config(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": GPT2Config(n_layer=48, n_head=25, n_embd=1600),  # 1.5B
    # MindFormers' configs/gpt2/run_gpt2_13b.yaml: 40 layers, 40 heads, hidden 5120, seq_length 2048.
    "gpt2-13b": GPT2Config(n_layer=40, n_head=40, n_embd=5120, n_positions=2048),
}
