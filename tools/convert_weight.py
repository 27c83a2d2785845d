"""Convert GPT-2 weights: Hugging Face or MindFormers -> this project's model directory, and back to Hugging Face.

    # MindFormers' documented command line: a PyTorch state_dict to a MindSpore checkpoint (this project's names)
    python tools/convert_weight.py --layers 12 --torch_path pytorch_model.bin --mindspore_path mindspore_gpt2.ckpt
    # a Hugging Face model directory to a model directory (config, weights, tokenizer files)
    python tools/convert_weight.py --src hf_gpt2/ --dst models/gpt2 [--format safetensors|ckpt]
    # a MindFormers GPT-2 checkpoint (backbone.blocks.N... names) to a model directory
    python tools/convert_weight.py --src gpt2.ckpt --preset gpt2 --dst models/gpt2
    # a model directory back to a Hugging Face directory that transformers loads
    python tools/convert_weight.py --export_hf --src models/gpt2 --dst hf_out/ [--hf_format safetensors|bin]

Every source key is accounted for: attention-mask buffers (`attn.bias`, `attn.masked_bias`, MindFormers'
`attention.beta/masked_beta`), a tied `lm_head.weight` and MindFormers optimizer state are dropped and reported;
any other unknown, missing or mis-shaped key stops the conversion naming it. Output is written under a
temporary name and renamed, so a failed run leaves nothing behind, and the temporaries a killed run left
are removed by the next run for the same destination. A destination directory is replaced only when it is
empty or already a model directory; anything else needs --overwrite (its files would be lost). An existing
.ckpt/.safetensors destination file is replaced. torch is imported only to read .bin files.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial

import numpy as np

if __package__ in (None, ""):  # run as `python tools/convert_weight.py`: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.checkpoint import (  # noqa: E402
    CONFIG_NAME,
    SAFETENSORS_NAME,
    TOKENIZER_FILES,
    CheckpointError,
    check_destination,
    check_not_inside,
    check_state_dict,
    copy_tokenizer_files,
    parameter_shapes,
    read_weights,
    write_model_dir,
    write_weights,
)
from model.atomic_write import write_atomically  # noqa: E402
from model.config import PRESETS, GPT2Config  # noqa: E402
from model.quantize import dequantize_state, is_quantized, mark_quantized, quantize_state, unmark_quantized  # noqa: E402

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_DTYPES = {"float32": np.float32, "float16": np.float16}
_HF_BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
# MindFormers training checkpoints carry optimizer and loop state next to the weights.
_MF_STATE = re.compile(r"^(adam_m\.|adam_v\.|moment\d?\.|accu_grads\.|global_step$|learning_rate$|"
                       r"scale_sense$|loss_scale$|current_iterator_step$|last_overflow_iterator_step$|"
                       r"epoch_num$|step_num$)")


@dataclass
class Summary:
    """What a conversion did, for printing and for tests."""

    src: str
    dst: str
    source_format: str
    tensors: int = 0
    parameters: int = 0
    dtype: str = "float32"
    dropped: dict[str, list[str]] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"converted {self.tensors} tensors ({self.parameters:,} parameters, {self.dtype}) "
                 f"from {self.src} ({self.source_format}) to {self.dst}"]
        for why, keys in self.dropped.items():
            if keys:
                lines.append(f"  dropped {len(keys)} {why}")
        return "\n".join(lines)


# ---- key maps ----------------------------------------------------------------------------------------------

def from_hf(state: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """Hugging Face state_dict (with or without `transformer.`) -> this project's names; returns (state, dropped)."""
    out: dict[str, np.ndarray] = {}
    dropped: dict[str, list[str]] = {"attention-mask buffers": [], "tied lm_head.weight": []}
    lm_head = None
    for key, value in state.items():
        if key == "lm_head.weight":
            lm_head = value
            continue
        name = key[len("transformer."):] if key.startswith("transformer.") else key
        if _HF_BUFFER.match(name):
            dropped["attention-mask buffers"].append(key)
            continue
        target = "transformer." + name
        if target in out:
            raise CheckpointError(f"key {key} appears both with and without the 'transformer.' prefix")
        out[target] = value
    if lm_head is not None:
        wte = out.get("transformer.wte.weight")
        if wte is not None and (wte.shape != lm_head.shape or not np.array_equal(wte, lm_head)):
            raise CheckpointError("lm_head.weight differs from wte.weight: untied LM heads are not supported")
        dropped["tied lm_head.weight"].append("lm_head.weight")
    return out, dropped


_MF_LAYER = {
    "layernorm1.gamma": "ln_1.weight", "layernorm1.beta": "ln_1.bias",
    "layernorm2.gamma": "ln_2.weight", "layernorm2.beta": "ln_2.bias",
    "attention.projection.weight": "attn.c_proj.weight", "attention.projection.bias": "attn.c_proj.bias",
    "output.mapping.weight": "mlp.c_fc.weight", "output.mapping.bias": "mlp.c_fc.bias",
    "output.projection.weight": "mlp.c_proj.weight", "output.projection.bias": "mlp.c_proj.bias",
}
_MF_GLOBAL = {
    "backbone.layernorm.gamma": "transformer.ln_f.weight",
    "backbone.layernorm.beta": "transformer.ln_f.bias",
    "backbone.embedding.word_embedding.embedding_table": "transformer.wte.weight",
    "backbone.embedding.position_embedding.embedding_table": "transformer.wpe.weight",
}
_MF_BLOCK = re.compile(r"^backbone\.blocks\.(\d+)\.(.+)$")


def from_mindformers(state: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """MindFormers GPT-2 names -> this project's; q/k/v dense{1,2,3} ([out, in]) are transposed and joined."""
    out: dict[str, np.ndarray] = {}
    dropped: dict[str, list[str]] = {"attention-mask buffers": [], "optimizer/training-state entries": []}
    qkv: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    unknown = []
    for key, value in state.items():
        if key in _MF_GLOBAL:
            out[_MF_GLOBAL[key]] = value
            continue
        if _MF_STATE.match(key):
            dropped["optimizer/training-state entries"].append(key)
            continue
        m = _MF_BLOCK.match(key)
        if not m:
            unknown.append(key)
            continue
        i, rest = int(m.group(1)), m.group(2)
        if rest in _MF_LAYER:
            out[f"transformer.h.{i}.{_MF_LAYER[rest]}"] = value
        elif rest in ("attention.beta", "attention.masked_beta"):
            dropped["attention-mask buffers"].append(key)
        elif (dm := re.fullmatch(r"attention\.dense([123])\.(weight|bias)", rest)):
            # Weights are Linear [out, in]: transpose back to Conv1D [in, out].
            v = value.T if dm.group(2) == "weight" else value
            qkv.setdefault((i, dm.group(2)), {})["qkv"[int(dm.group(1)) - 1]] = v
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"unknown MindFormers keys: {', '.join(sorted(unknown))}")
    for (i, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            missing = [f"backbone.blocks.{i}.attention.dense{n}.{kind}"
                       for n, p in ((1, "q"), (2, "k"), (3, "v")) if p not in parts]
            raise CheckpointError(f"missing MindFormers keys: {', '.join(missing)}")
        out[f"transformer.h.{i}.attn.c_attn.{kind}"] = np.concatenate([parts["q"], parts["k"], parts["v"]], -1)
    return out, dropped


# ---- reading sources ---------------------------------------------------------------------------------------

def read_state(path: str) -> dict[str, np.ndarray]:
    """Any weights file -> numpy arrays: PyTorch .bin/.pt/.pth, .safetensors (any dtype) or MindSpore .ckpt."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no weights file at {path}")
    if path.endswith((".bin", ".pt", ".pth")):
        return _read_torch(path)
    if path.endswith(".safetensors"):
        try:
            return read_weights(path)
        except CheckpointError as e:
            # numpy has no bfloat16: read such files through torch before giving up.
            if "bf16" not in str(e).lower() and "bfloat16" not in str(e).lower():
                raise
            return _read_safetensors_torch(path)
    if path.endswith(".ckpt"):
        return read_weights(path)
    raise CheckpointError(f"unknown weights file type {path}; expected .bin/.pt/.pth, .safetensors or .ckpt")


def _read_torch(path: str) -> dict[str, np.ndarray]:
    import torch

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle errors, ... all mean the same to the user
        raise CheckpointError(f"cannot read PyTorch checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{path} holds a {type(sd).__name__}, not a state_dict")
    if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: entry {k} is a {type(v).__name__}, not a tensor")
        out[k] = (v.float() if v.is_floating_point() else v).numpy()
    return out


def _read_safetensors_torch(path: str) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file

    return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in load_file(path).items()}


def _hf_weights_file(src: str) -> str:
    for name in HF_WEIGHT_FILES:
        if os.path.isfile(os.path.join(src, name)):
            return os.path.join(src, name)
    found = sorted(os.listdir(src))
    raise FileNotFoundError(f"no {' or '.join(HF_WEIGHT_FILES)} in {src} (found: {', '.join(found) or 'nothing'})")


def infer_config(state: Mapping[str, np.ndarray], *, n_head: int | None = None) -> GPT2Config:
    """A config with the shapes found in `state` (n_head does not show in shapes: taken from a matching preset)."""
    try:
        vocab, d = state["transformer.wte.weight"].shape
        n_pos = state["transformer.wpe.weight"].shape[0]
        inner = state["transformer.h.0.mlp.c_fc.weight"].shape[1]
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"cannot infer the model shape: missing or malformed tensor {e}") from None
    layers = {int(m.group(1)) for k in state if (m := re.match(r"^transformer\.h\.(\d+)\.", k))}
    n_layer = max(layers) + 1 if layers else 0
    if n_head is None:
        n_head = next((p.n_head for p in PRESETS.values() if p.n_embd == d), 1)
    return GPT2Config(vocab_size=vocab, n_positions=n_pos, n_embd=d, n_layer=n_layer, n_head=n_head,
                      n_inner=None if inner == 4 * d else inner)


# ---- conversions -------------------------------------------------------------------------------------------

def convert(
    *,
    src: str,
    dst: str,
    source_format: str = "auto",
    config: str | GPT2Config | None = None,
    layers: int | None = None,
    weights_format: str | None = None,
    dtype: str = "float32",
    tokenizer_dir: str | None = None,
    overwrite: bool = False,
    quantize: str | None = None,
) -> Summary:
    """Convert a Hugging Face or MindFormers checkpoint (file or directory) into this project's format.

    src: a Hugging Face model directory, or a weights file (.bin/.pt/.pth/.safetensors/.ckpt).
    dst: a model directory, or a single weights file when it ends in .ckpt or .safetensors.
    source_format: "hf", "mindformers" or "auto" (MindFormers when keys start with `backbone.`).
    config: config.json path, model directory or preset name; default: src's config.json, else inferred from
      shapes (enough for a weights file; a model directory needs the real n_head, so pass one).
    layers: expected layer count (MindFormers' --layers); a mismatch is an error.
    overwrite: replace a destination directory that is neither empty nor a model directory (FileExistsError
      otherwise, before anything is read or written).
    quantize: "int8" writes a quantized model directory (model.quantize: the projections and the embedding int8
      with per-row scales, recorded in config.json); a quantized source is read as the float weights it stands for.
    """
    if quantize not in (None, "int8"):
        raise ValueError(f"unknown quantization {quantize!r}; use int8")
    if quantize and dst.endswith((".ckpt", ".safetensors")):
        raise ValueError("--quantize writes a model directory (its config.json records the quantization), not a "
                         "weights file")
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    if source_format not in ("auto", "hf", "mindformers"):
        raise ValueError(f"unknown source format {source_format!r}; use auto, hf or mindformers")
    to_file = dst.endswith((".ckpt", ".safetensors"))
    check_not_inside(src, dst)
    _check_dst(dst, to_file=to_file, overwrite=overwrite)
    src_cfg = None
    if os.path.isdir(src):
        weights_path = _hf_weights_file(src)
        if os.path.isfile(os.path.join(src, CONFIG_NAME)):
            src_cfg = GPT2Config.from_json(os.path.join(src, CONFIG_NAME))
        if tokenizer_dir is None and any(os.path.isfile(os.path.join(src, n)) for n in TOKENIZER_FILES):
            tokenizer_dir = src
    else:
        weights_path = src
    raw = read_state(weights_path)
    if src_cfg is not None and is_quantized(src_cfg):
        raw = dequantize_state(raw)[0]
        src_cfg = unmark_quantized(src_cfg)
    if source_format == "auto":
        source_format = "mindformers" if any(k.startswith("backbone.") for k in raw) else "hf"
    state, dropped = (from_mindformers if source_format == "mindformers" else from_hf)(raw)

    cfg = _resolve_config(config) or src_cfg
    if cfg is None:
        cfg = infer_config(state)
        explicit_cfg = False
    else:
        explicit_cfg = True
    if layers is not None and layers != cfg.n_layer:
        raise CheckpointError(f"--layers {layers} does not match the checkpoint/config ({cfg.n_layer} layers)")
    check_state_dict(state, cfg, source=f"weights in {weights_path}")
    state = {k: state[k].astype(_DTYPES[dtype]) for k in parameter_shapes(cfg)}
    if quantize:
        state, cfg, dtype = quantize_state(state), mark_quantized(cfg), "int8"

    if to_file:
        if weights_format is not None and not dst.endswith(weights_format):
            raise ValueError(f"--format {weights_format} contradicts the destination file name {dst}")
        write_atomically(dst, lambda tmp: write_weights(state, tmp))
    else:
        if not explicit_cfg:
            raise ValueError("a model directory needs a config: the source has no config.json, so pass "
                             "--config (a config.json or model directory) or --preset NAME")
        write_model_dir(dst, cfg, state, weights_format=weights_format or "safetensors", tokenizer_dir=tokenizer_dir,
                        overwrite=overwrite)
    return Summary(src=src, dst=dst, source_format=source_format, tensors=len(state),
                   parameters=sum(int(v.size) for v in state.values()), dtype=dtype, dropped=dropped)


def export_hf(
    *,
    src: str,
    dst: str,
    hf_format: str = "safetensors",
    config: str | GPT2Config | None = None,
    tokenizer_dir: str | None = None,
    overwrite: bool = False,
) -> Summary:
    """Write a Hugging Face GPT-2 directory (config.json, model.safetensors or pytorch_model.bin, tokenizer files)
    from one of this project's model directories (or a weights file plus `config`). `dst` is replaced under the
    same rules as convert()'s (`overwrite` for a directory that is neither empty nor a model directory)."""
    if hf_format not in ("safetensors", "bin"):
        raise ValueError(f"unknown Hugging Face format {hf_format!r}; use safetensors or bin")
    check_not_inside(src, dst)
    _check_dst(dst, to_file=False, overwrite=overwrite)
    if os.path.isdir(src):
        from model.checkpoint import find_weights

        weights_path = find_weights(src)
        cfg = _resolve_config(config) or GPT2Config.from_json(os.path.join(src, CONFIG_NAME))
        if tokenizer_dir is None and any(os.path.isfile(os.path.join(src, n)) for n in TOKENIZER_FILES):
            tokenizer_dir = src
    else:
        weights_path = src
        cfg = _resolve_config(config)
        if cfg is None:
            raise ValueError("exporting a weights file needs --config or --preset")
    # A model directory's names and layouts are already Hugging Face's: the state is written as it is (a quantized
    # one's as the float32 weights it stands for: transformers has no loader for it).
    state = read_state(weights_path)
    if is_quantized(cfg):
        state, cfg = dequantize_state(state)[0], unmark_quantized(cfg)
    check_state_dict(state, cfg, source=f"weights in {weights_path}")

    def write(tmp_dir: str) -> None:
        cfg.to_json(os.path.join(tmp_dir, CONFIG_NAME))
        if hf_format == "safetensors":
            write_weights(state, os.path.join(tmp_dir, SAFETENSORS_NAME))
        else:
            import torch

            torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()},
                       os.path.join(tmp_dir, "pytorch_model.bin"))
        if tokenizer_dir is not None:
            copy_tokenizer_files(tmp_dir, tokenizer_dir)

    write_atomically(dst, write, directory=True, check=partial(check_destination, overwrite=overwrite))
    return Summary(src=src, dst=dst, source_format="mindspore model directory" if os.path.isdir(src) else "weights",
                   tensors=len(state), parameters=sum(int(v.size) for v in state.values()),
                   dtype=str(next(iter(state.values())).dtype))


def _resolve_config(config: str | GPT2Config | None) -> GPT2Config | None:
    if config is None or isinstance(config, GPT2Config):
        return config
    if config in PRESETS:
        return GPT2Config.from_preset(config)
    if os.path.exists(config):
        return GPT2Config.from_json(config)
    raise ValueError(f"--config {config!r} is neither a file/directory nor a preset ({', '.join(PRESETS)})")


def _check_dst(dst: str, *, to_file: bool, overwrite: bool) -> None:
    # Checked before the (slow, large) source is read; the writers check again before replacing.
    if to_file:
        if os.path.isdir(dst):
            raise IsADirectoryError(f"destination {dst} is a directory; a .ckpt/.safetensors destination is the "
                                    "weights file to write")
    else:
        check_destination(dst, overwrite=overwrite, hint="pass --overwrite to replace it")


# ---- command line ------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert_weight.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--torch_path", help="MindFormers-style: source PyTorch state_dict (same as --src)")
    p.add_argument("--mindspore_path", help="MindFormers-style: output MindSpore checkpoint (same as --dst)")
    p.add_argument("--layers", type=int, help="expected number of layers (checked)")
    p.add_argument("--src", help="source model directory or weights file")
    p.add_argument("--dst", help="destination model directory (an existing one must be empty or a model directory "
                                 "unless --overwrite), or a .ckpt/.safetensors weights file")
    p.add_argument("--source_format", choices=("auto", "hf", "mindformers"), default="auto")
    p.add_argument("--config", help="config.json, model directory or preset name for the source")
    p.add_argument("--preset", choices=tuple(PRESETS), help="use a preset config (same as --config NAME)")
    p.add_argument("--format", dest="weights_format", choices=("safetensors", "ckpt"),
                   help="weights file format of a destination model directory (default safetensors)")
    p.add_argument("--dtype", choices=tuple(_DTYPES), default="float32")
    p.add_argument("--quantize", choices=("int8",),
                   help="write int8 weights with a float32 scale per output row (serve with --quantize int8)")
    p.add_argument("--tokenizer_dir", help="copy tokenizer files from here (default: the source directory's)")
    p.add_argument("--export_hf", action="store_true", help="export a model directory to Hugging Face format")
    p.add_argument("--hf_format", choices=("safetensors", "bin"), default="safetensors")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a destination directory that is neither empty nor a model directory")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    src = args.src or args.torch_path
    dst = args.dst or args.mindspore_path
    if not src or not dst:
        parser.error("give a source (--src or --torch_path) and a destination (--dst or --mindspore_path)")
    if args.preset and args.config:
        parser.error("--preset and --config are exclusive")
    config = args.preset or args.config
    try:
        if args.export_hf:
            summary = export_hf(src=src, dst=dst, hf_format=args.hf_format, config=config,
                                tokenizer_dir=args.tokenizer_dir, overwrite=args.overwrite)
        else:
            summary = convert(src=src, dst=dst, source_format=args.source_format, config=config, layers=args.layers,
                              weights_format=args.weights_format, dtype=args.dtype, tokenizer_dir=args.tokenizer_dir,
                              overwrite=args.overwrite, quantize=args.quantize)
    except (ValueError, TypeError, OSError) as e:  # CheckpointError is a ValueError; no traceback for user errors
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
