"""Int8 quantization of a GPT-2 state dict's weights, and the quantized model directory's format.

What is quantized: the four projections of every block and the token embedding (which is also the tied LM head),
each as int8 with a float32 scale per output row (model.kernels.quantize_int8: symmetric, scale = max|row| / 127).
Layer norms, biases and the position embedding stay float32; the kernels quantize each projection's input rows on
the fly to int16 and sum integers (see model/kernels). Per output row rather than per group of 32/64 along K: one
scale per row keeps the kernels' inner loop a plain integer multiply-add over all of K, and the measured quality
loss (bench/quality.py) is within the issue's 1% of perplexity.

A quantized directory's `model.safetensors` holds each quantized weight as int8 under its usual name and in its
usual (Hugging Face) layout, plus `<name>_scale` (out,) float32, as vLLM's int8/fp8 checkpoints name their scales;
`config.json` records `quantization_config` (QUANTIZATION_CONFIG). transformers cannot load such a directory;
`tools/convert_weight.py --export_hf` writes the dequantized float32 weights for it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from . import kernels
from .gpt2 import is_transposed_weight

QUANT_METHOD = "gpt2_int8_weight_only"
QUANTIZATION_CONFIG = {"quant_method": QUANT_METHOD, "bits": 8, "granularity": "per_output_channel",
                       "symmetric": True, "activations": "float32"}
SCALE_SUFFIX = "_scale"
EMBEDDING = "transformer.wte.weight"


def is_quantized_name(name: str) -> bool:
    """Whether `name` is stored int8 in a quantized directory (the projections and the token embedding)."""
    return is_transposed_weight(name) or name == EMBEDDING


def is_quantized(cfg) -> bool:
    """Whether a GPT2Config comes from a quantized directory."""
    qc = cfg.extra.get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def mark_quantized(cfg):
    """A copy of the config that records the quantization (written to config.json)."""
    return dataclasses.replace(cfg, extra={**cfg.extra, "quantization_config": dict(QUANTIZATION_CONFIG)})


def unmark_quantized(cfg):
    """A copy of the config without the quantization record (for the dequantized weights)."""
    return dataclasses.replace(cfg, extra={k: v for k, v in cfg.extra.items() if k != "quantization_config"})


def _rows_first(name: str, a: np.ndarray) -> np.ndarray:
    # Hugging Face's Conv1D layout is [in, out]; quantization works per output row, [out, in].
    return a.T if is_transposed_weight(name) else a


def quantize_state(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A float state dict (Hugging Face names and layouts) -> the quantized directory's: each quantized weight
    int8 in the same layout, plus its `_scale`; everything else as float32."""
    out: dict[str, np.ndarray] = {}
    for name, a in state.items():
        if is_quantized_name(name):
            q, scale = kernels.quantize_int8(_rows_first(name, np.asarray(a)))
            out[name] = np.ascontiguousarray(_rows_first(name, q))
            out[name + SCALE_SUFFIX] = scale
        else:
            out[name] = np.asarray(a, np.float32)
    return out


def dequantize_state(state: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict]:
    """A quantized directory's state -> (the float32 state dict it stands for, {name: (q [out, in] int8, scale)}
    for the session to run as is). ValueError names any tensor that is not what the format says."""
    floats: dict[str, np.ndarray] = {}
    int8: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, a in state.items():
        if name.endswith(SCALE_SUFFIX) and is_quantized_name(name[: -len(SCALE_SUFFIX)]):
            if name[: -len(SCALE_SUFFIX)] not in state:
                raise ValueError(f"{name} has no weight {name[: -len(SCALE_SUFFIX)]}")
            continue
        if not is_quantized_name(name):
            floats[name] = np.asarray(a, np.float32)
            continue
        scale = state.get(name + SCALE_SUFFIX)
        q = _rows_first(name, np.asarray(a))
        if a.dtype != np.int8 or scale is None or scale.dtype != np.float32 or scale.shape != (q.shape[0],):
            raise ValueError(f"{name} must be int8 with a float32 {name}{SCALE_SUFFIX} of shape ({q.shape[0]},) in "
                             f"a quantized model directory, got {a.dtype} and "
                             f"{None if scale is None else (scale.dtype, scale.shape)}")
        q = np.ascontiguousarray(q)
        int8[name] = (q, scale)
        floats[name] = _rows_first(name, q.astype(np.float32) * scale[:, None])
    return floats, int8
