"""The training loop behind tools/train.py: train, finetune and eval runs from a RunConfig.

    result = run(cfg)                       # train / finetune, then output_dir/model is a servable model dir
    result = run(cfg, resume=True)          # continue from the newest checkpoint in output_dir/checkpoints
    report = evaluate(cfg)                  # eval: perplexity of cfg.model.pretrained on the validation split

Each optimizer step runs `grad_accum_steps` compiled micro-steps (see step.py); the Python loop only picks the
rows (data.BatchPlan), computes the learning rate (schedule.py), and reports. A resumed run restores the
parameters, the AdamW moments and step, the loss scale and MindSpore's RNG state, and continues the data order
at the same sample, so it retraces the uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import CheckpointError, CheckpointManager
from .config import ConfigError, RunConfig
from .data import BatchPlan, DatasetError, load_samples, split_path
from .runlog import RunLogger, plot_loss_curve
from .schedule import learning_rate


@dataclass
class RunResult:
    step: int
    model_dir: Path | None  # None when stopped before the end (stop_at_step)
    train_loss: float | None  # mean over the last logging interval
    val_loss: float | None
    val_ppl: float | None
    tokens_per_s: float
    seconds: float
    weights_digest: str = ""  # sha256 of the final parameters; equal on every data-parallel process


@dataclass
class EvalReport:
    loss: float  # mean next-token cross-entropy, nats
    perplexity: float
    tokens: int  # predicted tokens
    samples: int
    unigram_perplexity: float | None = None  # add-one unigram model fitted on the train split

    def format(self) -> str:
        text = f"eval: {self.samples} samples, {self.tokens} tokens, loss {self.loss:.4f}, perplexity {self.perplexity:.2f}"
        if self.unigram_perplexity is not None:
            text += f"\nunigram baseline perplexity (add-one, fitted on the train split): {self.unigram_perplexity:.2f}"
        return text


# ---- process setup ----------------------------------------------------------------------------------------

_DEVICE_SET: str | None = None


def setup_device(target: str) -> None:
    """Select the device and graph mode once per process (MindSpore refuses a second, different choice)."""
    global _DEVICE_SET
    if _DEVICE_SET is None:
        from model.runtime import set_device

        set_device(target)
        _DEVICE_SET = target
    elif _DEVICE_SET != target:
        raise ConfigError(f"this process already runs on {_DEVICE_SET}; cannot switch to {target}")


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


# ---- model ------------------------------------------------------------------------------------------------


def build_model(cfg: RunConfig):
    """A fresh model from a preset (train) or the weights of a model directory (finetune, eval, or train from one)."""
    from model import GPT2Config, GPT2LMHeadModel

    overrides = dict(cfg.model.config)
    fields = [f.name for f in dataclasses.fields(GPT2Config) if f.name != "extra"]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ConfigError(f"model.config has unknown GPT2Config fields {unknown}; valid fields: {', '.join(fields)}")
    dtype = cfg.model.precision
    if cfg.model.pretrained:
        model = GPT2LMHeadModel.from_pretrained(cfg.model.pretrained, compute_dtype=dtype)
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


# ---- evaluation -------------------------------------------------------------------------------------------


class Evaluator:
    """Validation loss over a fixed set of samples, one compiled batch shape (the last batch is padded)."""

    def __init__(self, model, samples: np.ndarray, *, batch_size: int, max_batches: int | None) -> None:
        from .step import EvalStep

        self.model = model
        n = len(samples) if max_batches is None else min(len(samples), max_batches * batch_size)
        self.samples = samples[:n]
        self.batch_size = min(batch_size, n)
        self.cell = EvalStep(model)

    def __call__(self) -> tuple[float, int]:
        """(mean loss in nats per predicted token, predicted tokens)."""
        import mindspore as ms

        self.cell.set_train(False)
        total, rows = 0.0, len(self.samples)
        for start in range(0, rows, self.batch_size):
            batch = self.samples[start : start + self.batch_size]
            real = len(batch)
            if real < self.batch_size:  # pad to the compiled shape; the padding rows are not counted
                batch = np.concatenate([batch, np.repeat(batch[:1], self.batch_size - real, axis=0)])
            nll = self.cell(ms.Tensor(batch, ms.int32)).asnumpy()
            total += float(nll[:real].astype(np.float64).sum())
        tokens = rows * (self.samples.shape[1] - 1)
        return total / tokens, tokens


def unigram_perplexity(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Perplexity on `val`'s predicted tokens of an add-one-smoothed unigram model counted on `train`."""
    counts = np.bincount(train.ravel(), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(np.exp(-logp[val[:, 1:].ravel()].mean()))


def evaluate(cfg: RunConfig, *, split: str = "validation", model=None) -> EvalReport:
    """Perplexity of the model (cfg.model.pretrained, or `model`) on one split of cfg.data.dataset_dir."""
    if not cfg.data.dataset_dir:
        raise ConfigError("eval needs data: pass --dataset_dir DIR")
    setup_device(cfg.device_target)
    check_parallel(cfg)
    if model is None:
        model = build_model(cfg)
    samples = load_samples(cfg.data.dataset_dir, split, seq_length=cfg.data.seq_length)
    evaluator = Evaluator(model, samples, batch_size=cfg.eval.batch_size, max_batches=cfg.eval.max_batches)
    loss, tokens = evaluator()
    unigram = None
    if split != "train" and _optional_split(cfg.data.dataset_dir, "train", cfg.data.seq_length) is not None:
        train = load_samples(cfg.data.dataset_dir, "train")
        unigram = unigram_perplexity(train, evaluator.samples, model.config.vocab_size)
    return EvalReport(
        loss=loss, perplexity=math.exp(loss), tokens=tokens, samples=len(evaluator.samples), unigram_perplexity=unigram
    )


# ---- training ---------------------------------------------------------------------------------------------


def run(
    cfg: RunConfig,
    *,
    resume: bool | str = False,
    stop_at_step: int | None = None,
    tokenizer: Any = None,
) -> RunResult:
    """Train or finetune as `cfg` says; see the module docstring. `stop_at_step` ends early (as an interruption)."""
    import mindspore as ms

    from .step import AdamW, LossScale, TrainStep

    if cfg.run_mode == "eval":
        raise ConfigError("run() trains; use evaluate() for run_mode eval")
    if not cfg.data.dataset_dir:
        raise ConfigError("training needs data: pass --dataset_dir DIR (made by tools/prepare_data.py)")
    check_parallel(cfg)
    setup_device(cfg.device_target)
    rank, world = init_distributed(cfg)
    out = Path(cfg.output_dir)
    is_main = rank == 0

    # The same seed on every process gives every process the same initial weights.
    ms.set_seed(cfg.seed)
    model = build_model(cfg)
    model.set_train(True)
    seq = cfg.data.seq_length
    train_rows = load_samples(cfg.data.dataset_dir, "train", seq_length=seq)
    val_rows = _optional_split(cfg.data.dataset_dir, "validation", seq)

    t = cfg.train
    optimizer = AdamW(model.trainable_params(), weight_decay=t.weight_decay, beta1=t.beta1, beta2=t.beta2, eps=t.eps)
    loss_scale = LossScale(t.loss_scale) if cfg.model.precision == "float16" else None
    step_fn = TrainStep(
        model, optimizer, accum_steps=t.grad_accum_steps, grad_clip=t.grad_clip, world_size=world, loss_scale=loss_scale
    )
    evaluator = (
        Evaluator(model, val_rows, batch_size=cfg.eval.batch_size, max_batches=cfg.eval.max_batches)
        if val_rows is not None
        else None
    )
    plan = BatchPlan(len(train_rows), t.batch_size, t.grad_accum_steps, world, rank, cfg.seed)
    manager = CheckpointManager(out / "checkpoints", keep=cfg.checkpoint.keep)
    fingerprint = {
        "seed": cfg.seed,
        "seq_length": seq,
        "global_batch": plan.global_batch,
        "train_samples": len(train_rows),
        "precision": cfg.model.precision,
    }

    start = 0
    if resume:
        start = _restore(manager, resume, model, optimizer, loss_scale, fingerprint)
    log = RunLogger(
        out, total_steps=t.max_steps, start_step=start, enabled=is_main, progress_bar=cfg.logging.progress_bar
    )
    if is_main:
        log.write(
            f"{cfg.run_mode}: {count_parameters(model):,} parameters, {len(train_rows):,} train samples of "
            f"{seq + 1} tokens, global batch {plan.global_batch} ({world} process(es) x {t.grad_accum_steps} "
            f"micro-steps x {t.batch_size}), steps {start} -> {t.max_steps}"
        )
        if start:
            log.write(f"resumed from step {start} (epoch {plan.epoch_of(start):.2f})")

    tokens_per_step = plan.global_batch * seq
    end = t.max_steps if stop_at_step is None else min(t.max_steps, stop_at_step)
    # Throughput counts step time only: validation and checkpoint writing are left out.
    window = {"loss": 0.0, "steps": 0, "seconds": 0.0}
    run_start, steps_done, step_seconds = time.time(), 0, 0.0
    last_train_loss = val_loss = None
    step = start
    while step < end:
        tick = time.time()
        lr = learning_rate(step, lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps, max_steps=t.max_steps)
        micro_losses = [step_fn.micro(_batch(train_rows, plan, step, m)) for m in range(t.grad_accum_steps - 1)]
        loss, norm, applied = step_fn.last(_batch(train_rows, plan, step, t.grad_accum_steps - 1), lr)
        # The last micro-step's loss is already averaged over processes; the earlier ones are local.
        loss_value = float(loss.asnumpy())
        if micro_losses:
            loss_value = _step_loss(micro_losses, loss_value, world)
        step += 1
        steps_done += 1
        elapsed = time.time() - tick
        if steps_done > 1:  # the first step includes compiling
            step_seconds += elapsed
        window["loss"] += loss_value
        window["steps"] += 1
        window["seconds"] += elapsed
        if not math.isfinite(loss_value) and loss_scale is None:
            raise FloatingPointError(f"training loss is {loss_value} at step {step}; lower train.lr")
        if step % cfg.logging.interval == 0 or step == end:
            last_train_loss = window["loss"] / window["steps"]
            record = {
                "step": step,
                "loss": round(last_train_loss, 6),
                "lr": lr,
                "grad_norm": round(float(norm.asnumpy()), 6),
                "tokens_per_s": round(window["steps"] * tokens_per_step / max(window["seconds"], 1e-9), 1),
                "epoch": round(plan.epoch_of(step), 4),
                "elapsed_s": round(time.time() - run_start, 1),
            }
            if not bool(applied.asnumpy()):
                record["skipped_update"] = True
            if loss_scale is not None:
                record["loss_scale"] = float(loss_scale.value.asnumpy())
            log.log(record)
            log.advance(window["steps"], loss=last_train_loss, lr=lr, tok_s=record["tokens_per_s"])
            window = {"loss": 0.0, "steps": 0, "seconds": 0.0}
        if evaluator is not None and cfg.eval.interval and step % cfg.eval.interval == 0 and step < t.max_steps:
            val_loss = _validate(evaluator, log, step)
        if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0 and step < t.max_steps and is_main:
            _save(manager, step, model, optimizer, loss_scale, fingerprint)
    seconds = time.time() - run_start
    tokens_per_s = (steps_done - 1) * tokens_per_step / step_seconds if steps_done > 1 else 0.0

    if step < t.max_steps:  # stopped early on request
        if is_main and cfg.checkpoint.interval and step % cfg.checkpoint.interval:
            _save(manager, step, model, optimizer, loss_scale, fingerprint)
        log.close()
        return RunResult(step, None, last_train_loss, val_loss, None, tokens_per_s, seconds)

    digest = weights_digest(model)
    if world > 1:
        # Every process prints it (msrun's worker logs), so identical weights across processes can be checked.
        print(f"rank {rank} of {world}: final weights sha256 {digest}", flush=True)
    val_ppl = None
    if evaluator is not None:
        val_loss = _validate(evaluator, log, step)
        val_ppl = math.exp(val_loss)
    model_dir = out / "model"
    if is_main:
        _save(manager, step, model, optimizer, loss_scale, fingerprint)
        save_model_dir(model, model_dir, tokenizer=tokenizer, weights_dtype=cfg.checkpoint.weights_dtype, summary={
            "run_mode": cfg.run_mode,
            "steps": step,
            "tokens_seen": step * tokens_per_step,
            "final_train_loss": last_train_loss,
            "final_val_loss": val_loss,
            "final_val_perplexity": val_ppl,
            "dataset_dir": str(cfg.data.dataset_dir),
        })
        log.log({"step": step, "event": "saved_model", "path": str(model_dir), "seconds": round(seconds, 1)})
        log.close()
        plot_loss_curve(log.path, out / "loss_curve.png")
    return RunResult(step, model_dir, last_train_loss, val_loss, val_ppl, tokens_per_s, seconds, digest)


def _optional_split(dataset: str, split: str, seq: int) -> np.ndarray | None:
    try:
        split_path(dataset, split)
    except DatasetError:
        return None
    return load_samples(dataset, split, seq_length=seq)


def _batch(rows: np.ndarray, plan: BatchPlan, step: int, micro: int):
    import mindspore as ms

    return ms.Tensor(rows[plan.indices(step, micro)], ms.int32)


def _step_loss(micro_losses, last_loss: float, world: int) -> float:
    """Mean loss of an optimizer step with accumulation: the earlier micro-steps' losses are averaged over
    processes here (one all-reduce), the last one already was inside the compiled step."""
    total = float(np.sum([float(x.asnumpy()) for x in micro_losses]))
    if world > 1:
        import mindspore as ms
        from mindspore import ops

        total = float(ops.AllReduce()(ms.Tensor(total, ms.float32)).asnumpy()) / world
    return (total + last_loss) / (len(micro_losses) + 1)


def _validate(evaluator: Evaluator, log: RunLogger, step: int) -> float:
    val_loss, tokens = evaluator()
    log.log({"step": step, "val_loss": round(val_loss, 6), "val_ppl": round(math.exp(val_loss), 3), "val_tokens": tokens})
    log.write(f"step {step}: validation loss {val_loss:.4f}, perplexity {math.exp(val_loss):.2f}")
    return val_loss


def _state_tensors(model, optimizer, loss_scale) -> dict[str, Any]:
    import mindspore as ms

    tensors: dict[str, Any] = {p.name: p for p in model.trainable_params()}
    tensors.update(optimizer.state())
    if loss_scale is not None:
        tensors["loss_scale.value"] = loss_scale.value
        tensors["loss_scale.good_steps"] = loss_scale.good_steps
    tensors["rng_state"] = ms.get_rng_state()
    return tensors


def _save(manager: CheckpointManager, step: int, model, optimizer, loss_scale, fingerprint: dict) -> None:
    manager.save(step, _state_tensors(model, optimizer, loss_scale), {"fingerprint": fingerprint})


def _restore(manager: CheckpointManager, resume: bool | str, model, optimizer, loss_scale, fingerprint) -> int:
    import mindspore as ms

    if isinstance(resume, str):
        from .checkpoint import Checkpoint

        path = Path(resume)
        if not (path / "trainer_state.json").is_file():
            raise CheckpointError(f"{path} is not a checkpoint directory (no trainer_state.json)")
        ckpt = Checkpoint(path, -1)
    else:
        ckpt = manager.latest()
        if ckpt is None:
            raise CheckpointError(f"--resume: no checkpoint in {manager.directory}")
    tensors, meta = ckpt.load()
    saved = meta.get("fingerprint", {})
    changed = {k: (saved.get(k), v) for k, v in fingerprint.items() if saved.get(k) != v}
    if changed:
        detail = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items())
        raise CheckpointError(f"cannot resume {ckpt.path}: the run's settings changed ({detail})")
    targets = {k: v for k, v in _state_tensors(model, optimizer, loss_scale).items() if k != "rng_state"}
    missing = sorted(set(targets) - set(tensors))
    if missing:
        raise CheckpointError(f"checkpoint {ckpt.path} lacks {len(missing)} tensors, e.g. {missing[:3]}")
    for name, param in targets.items():
        value = tensors[name]
        if tuple(value.shape) != tuple(param.shape):
            raise CheckpointError(f"checkpoint {ckpt.path}: {name} has shape {value.shape}, expected {param.shape}")
        param.set_data(ms.Tensor(value, param.dtype))
    if "rng_state" in tensors:
        ms.set_rng_state(ms.Tensor(tensors["rng_state"]))
    return int(meta["step"])


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
