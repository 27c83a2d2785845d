"""Process and model setup shared by training and evaluation: data-parallel group, the model.

Refuses the MindFormers parallel settings that are not implemented; builds the model from a preset or a model
directory; writes the final model directory.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from .config import ConfigError, RunConfig


def check_parallel(cfg: RunConfig) -> None:
    """Refuse the MindFormers parallel settings that this trainer does not implement."""
    p = cfg.parallel
    unsupported = {
        "model_parallel": (p.model_parallel, 1),
        "pipeline_stage": (p.pipeline_stage, 1),
        "optimizer_shard": (p.optimizer_shard, False),
        "micro_batch_num": (p.micro_batch_num, 1),
    }
    for name, (value, allowed) in unsupported.items():
        if value != allowed:
            raise ConfigError(
                f"parallel.{name}={value} is not implemented (only data parallelism is); set it to {allowed}"
                + (" and use train.grad_accum_steps for micro-batches" if name == "micro_batch_num" else "")
            )
    # vocab_emb_dp and gradient_aggregation_group only matter with model parallelism; they are accepted as is.


def init_distributed(cfg: RunConfig) -> tuple[int, int]:
    """(rank, world size). Processes started by msrun join MindSpore's collective group here."""
    launched = int(os.environ.get("MS_WORKER_NUM", "1"))
    want = cfg.parallel.data_parallel
    if launched != want:
        raise ConfigError(
            f"parallel.data_parallel is {want} but {launched} process(es) were started; start exactly "
            f"data_parallel processes (msrun --worker_num={want} ...) or set --parallel.data_parallel {launched}"
        )
    if want == 1:
        return 0, 1
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init

    init()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
    return get_rank(), get_group_size()


def build_model(cfg: RunConfig):
    """A fresh model from a preset (train) or the weights of a model directory (finetune, eval, or train from one)."""
    from model import GPT2Config, GPT2LMHeadModel
    from model.checkpoint import load_model_dir

    overrides = dict(cfg.model.config)
    fields = [f.name for f in dataclasses.fields(GPT2Config) if f.name != "extra"]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ConfigError(f"model.config has unknown GPT2Config fields {unknown}; valid fields: {', '.join(fields)}")
    dtype = cfg.model.precision
    if cfg.model.pretrained:
        model = load_model_dir(cfg.model.pretrained, compute_dtype=dtype)
        if overrides:
            # Settings such as dropout change the Cells, not the weights: rebuild and copy the weights over.
            try:
                new_cfg = dataclasses.replace(model.config, **overrides)
            except TypeError as e:
                raise ConfigError(f"model.config: {e}") from None
            fresh = GPT2LMHeadModel(new_cfg, compute_dtype=dtype)
            _copy_weights(model, fresh)
            model = fresh
    else:
        try:
            config = GPT2Config.from_preset(cfg.model.preset, **overrides)
        except TypeError as e:
            raise ConfigError(f"model.config: {e}") from None
        model = GPT2LMHeadModel(config, compute_dtype=dtype)
    if cfg.data.seq_length > model.config.n_positions:
        raise ConfigError(
            f"data.seq_length {cfg.data.seq_length} exceeds the model's n_positions {model.config.n_positions}"
        )
    return model


def _copy_weights(src, dst) -> None:
    theirs = {p.name: p for p in src.get_parameters()}
    for p in dst.get_parameters():
        q = theirs.get(p.name)
        if q is None or q.shape != p.shape:
            raise ConfigError(f"model.config changes the shape of {p.name}; only shape-free settings can change")
        p.set_data(q.data.copy())


def weights_digest(model) -> str:
    import hashlib

    h = hashlib.sha256()
    for p in sorted(model.trainable_params(), key=lambda p: p.name):
        h.update(p.name.encode())
        h.update(p.asnumpy().tobytes())
    return h.hexdigest()


def count_parameters(model) -> int:
    return sum(int(np.prod(p.shape)) for p in model.trainable_params())


def save_model_dir(
    model, path: Path, *, tokenizer: Any = None, weights_dtype: str = "float32", summary: dict | None = None
) -> None:
    """The servable model directory: config.json, weights and the tokenizer files (plus training.json)."""
    import json
    import tempfile

    from model.checkpoint import state_dict, write_model_dir

    if tokenizer is None:
        from tokenizer import GPT2Tokenizer

        tokenizer = GPT2Tokenizer.from_pretrained("gpt2")
    state = {k: v.astype(weights_dtype) for k, v in state_dict(model).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tok_dir:
        tokenizer.save_pretrained(tok_dir)
        write_model_dir(path, model.config, state, tokenizer_dir=tok_dir)
    if summary is not None:
        (path / "training.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
