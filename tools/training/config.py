"""Training run settings: frozen dataclasses read from a small YAML file, with command-line overrides.

A config file has the sections below; every key is optional and unknown keys are refused with the list of
valid ones. `--section.key VALUE` on the command line replaces one value (VALUE is read as YAML, so `3e-4`,
`true` and `[0.9, 0.95]` have their usual types). Knows nothing about MindSpore or the model code.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

RUN_MODES = ("train", "finetune", "eval")
DEVICE_TARGETS = ("CPU", "GPU", "Ascend")
PRECISIONS = ("float32", "float16", "bfloat16")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key and the bad value."""


@dataclass(frozen=True)
class ModelSection:
    # Where the starting model comes from: a GPT2Config preset (train), or a model directory (finetune, eval).
    preset: str | None = "gpt2"
    pretrained: str | None = None
    # GPT2Config fields that replace the preset's (n_layer, n_embd, n_head, n_positions, resid_pdrop, ...).
    config: dict[str, Any] = field(default_factory=dict)
    # Compute dtype of matmuls; parameters and optimizer state stay float32. float16 uses dynamic loss scaling.
    precision: str = "float32"


@dataclass(frozen=True)
class DataSection:
    dataset_dir: str | None = None  # made by tools/prepare_data.py: train.mindrecord, validation.mindrecord
    seq_length: int = 1024  # samples hold seq_length + 1 tokens (inputs and shifted labels)


@dataclass(frozen=True)
class TrainSection:
    batch_size: int = 8  # per process and micro-step
    grad_accum_steps: int = 1  # micro-steps per optimizer step
    max_steps: int = 1000  # optimizer steps
    lr: float = 6e-4
    min_lr: float = 6e-5  # the cosine decays to this at max_steps
    warmup_steps: int = 100
    weight_decay: float = 0.1  # not applied to biases, LayerNorm weights or the position table
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global L2 norm; 0 turns clipping off
    loss_scale: float = 65536.0  # initial dynamic loss scale, used with precision float16 only


@dataclass(frozen=True)
class EvalSection:
    interval: int = 200  # optimizer steps between validation runs; 0 evaluates only at the end
    max_batches: int | None = 20  # None evaluates the whole validation split
    batch_size: int = 4


@dataclass(frozen=True)
class CheckpointSection:
    interval: int = 200  # optimizer steps between checkpoints; 0 saves only at the end
    keep: int = 3  # the newest checkpoints kept on disk
    # dtype of the weights in the final model directory; float16 halves the file (loading casts back to float32).
    weights_dtype: str = "float32"


@dataclass(frozen=True)
class LoggingSection:
    interval: int = 10  # optimizer steps between log lines
    progress_bar: bool = True


@dataclass(frozen=True)
class ParallelSection:
    """MindFormers' parallel_config names. Only data_parallel is implemented; the others must keep these values."""

    data_parallel: int = 1  # must equal the number of processes msrun starts
    model_parallel: int = 1
    pipeline_stage: int = 1
    optimizer_shard: bool = False
    micro_batch_num: int = 1
    vocab_emb_dp: bool = True
    gradient_aggregation_group: int = 4


@dataclass(frozen=True)
class RunConfig:
    run_mode: str = "train"
    device_target: str = "CPU"
    seed: int = 1234
    output_dir: str = "runs/gpt2"  # checkpoints/, train_log.jsonl, loss_curve.png and the final model/
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)

    def __post_init__(self) -> None:
        _check_choice("run_mode", self.run_mode, RUN_MODES)
        _check_choice("device_target", self.device_target, DEVICE_TARGETS)
        _check_choice("model.precision", self.model.precision, PRECISIONS)
        if self.device_target == "CPU" and self.model.precision == "bfloat16":
            raise ConfigError("model.precision bfloat16 does not run on CPU (no bfloat16 CPU kernels); use float32")
        _check_choice("checkpoint.weights_dtype", self.checkpoint.weights_dtype, ("float32", "float16"))
        positive = {
            "data.seq_length": self.data.seq_length,
            "train.batch_size": self.train.batch_size,
            "train.grad_accum_steps": self.train.grad_accum_steps,
            "train.max_steps": self.train.max_steps,
            "eval.batch_size": self.eval.batch_size,
            "checkpoint.keep": self.checkpoint.keep,
            "logging.interval": self.logging.interval,
            "parallel.data_parallel": self.parallel.data_parallel,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        non_negative = {
            "train.lr": self.train.lr,
            "train.min_lr": self.train.min_lr,
            "train.warmup_steps": self.train.warmup_steps,
            "train.weight_decay": self.train.weight_decay,
            "train.grad_clip": self.train.grad_clip,
            "eval.interval": self.eval.interval,
            "checkpoint.interval": self.checkpoint.interval,
        }
        for name, value in non_negative.items():
            if value < 0:
                raise ConfigError(f"{name} must be >= 0, got {value}")
        if self.train.min_lr > self.train.lr:
            raise ConfigError(f"train.min_lr ({self.train.min_lr}) is larger than train.lr ({self.train.lr})")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self.train, name) < 1.0:
                raise ConfigError(f"train.{name} must be in [0, 1), got {getattr(self.train, name)}")
        if self.eval.max_batches is not None and self.eval.max_batches <= 0:
            raise ConfigError(f"eval.max_batches must be positive or null, got {self.eval.max_batches}")
        if self.run_mode == "train" and self.model.preset is None and self.model.pretrained is None:
            raise ConfigError("run_mode train needs model.preset (a GPT2Config preset) or model.pretrained")
        if self.run_mode in ("finetune", "eval") and not self.model.pretrained:
            raise ConfigError(
                f"run_mode {self.run_mode} needs a model directory: set model.pretrained "
                "or pass --load_checkpoint DIR"
            )

    @property
    def global_batch_size(self) -> int:
        return self.train.batch_size * self.train.grad_accum_steps * self.parallel.data_parallel

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTION_TYPES = {
    "model": ModelSection,
    "data": DataSection,
    "train": TrainSection,
    "eval": EvalSection,
    "checkpoint": CheckpointSection,
    "logging": LoggingSection,
    "parallel": ParallelSection,
}
_TOP_LEVEL = [f.name for f in dataclasses.fields(RunConfig) if f.name not in _SECTION_TYPES]


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML config (or start from the defaults with None) and apply dotted-key overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(raw).__name__}")
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    return from_dict(raw)


def from_dict(raw: dict[str, Any]) -> RunConfig:
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _SECTION_TYPES:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"section {key!r} must be a mapping, got {value!r}")
            kwargs[key] = _build_section(key, _SECTION_TYPES[key], value)
        elif key in _TOP_LEVEL:
            kwargs[key] = value
        else:
            valid = ", ".join(_TOP_LEVEL + list(_SECTION_TYPES))
            raise ConfigError(f"unknown config key {key!r}; valid keys: {valid}")
    return RunConfig(**kwargs)


def _build_section(name: str, cls: type, values: dict[str, Any]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    checked = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown key {name}.{key}; valid keys in {name}: {', '.join(fields)}")
        checked[key] = _checked_value(f"{name}.{key}", value, str(fields[key].type))
    return cls(**checked)


def _checked_value(name: str, value: Any, annotation: str) -> Any:
    if value is None:
        if "None" not in annotation:
            raise ConfigError(f"{name} must not be null")
        return value
    # YAML 1.1 reads 3e-4 (no dot) as a string; accept it for float settings.
    if annotation.startswith("float") and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if annotation.startswith("float") and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if annotation.startswith("dict"):
        ok = isinstance(value, dict)
    elif annotation.startswith("bool"):
        ok = isinstance(value, bool)
    elif annotation.startswith("int"):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif annotation.startswith("float"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:  # str | None
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{name} must be {annotation}, got {value!r}")
    return value


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`--train.lr 3e-4 --model.config.n_layer=4` -> {"train.lr": 3e-4, "model.config.n_layer": 4}."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unrecognised argument {arg!r}; config overrides look like --section.key VALUE")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg} needs a value")
            key, text = arg[2:], args[i + 1]
            i += 2
        try:
            out[key] = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"cannot read the value of {arg}: {e}") from None
    return out


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
