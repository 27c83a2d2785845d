"""The training loop behind tools/train.py: train, finetune and eval runs from a RunConfig.

    result = run(cfg)                       # train / finetune, then output_dir/model is a servable model dir
    result = run(cfg, resume=True)          # continue from the newest checkpoint in output_dir/checkpoints
    result = run(cfg, resume="auto")        # ... from the newest one that is intact, skipping damaged ones
    report = evaluate(cfg)                  # eval: perplexity of cfg.model.pretrained on the validation split

Each optimizer step runs `grad_accum_steps` compiled micro-steps (see step.py); the Python loop only picks the
rows (data.BatchPlan), computes the learning rate (schedule.py), and reports. A resumed run restores the
parameters, the AdamW moments and step, the loss scale and MindSpore's RNG state, and continues the data order
at the same sample, so it retraces the uninterrupted run. A checkpoint whose file no longer matches its recorded
size and checksum is refused (CheckpointError); only resume="auto" goes back to an earlier one, and says so.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import Checkpoint, CheckpointError, CheckpointManager
from .config import ConfigError, RunConfig
from .data import BatchPlan, load_samples
from .evaluate import EvalReport, Evaluator, optional_split, evaluate
from .runlog import RunLogger, plot_loss_curve
from .runtime import build_model, check_parallel, count_parameters, init_distributed, save_model_dir
from .runtime import weights_digest
from .schedule import learning_rate

__all__ = ["EvalReport", "RunResult", "evaluate", "run"]


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


def run(
    cfg: RunConfig,
    *,
    resume: bool | str = False,
    stop_at_step: int | None = None,
    tokenizer: Any = None,
) -> RunResult:
    """Train or finetune as `cfg` says; see the module docstring. `stop_at_step` ends early (as an interruption).

    resume: False; True (the newest checkpoint); "auto" (the newest intact one); or a checkpoint directory.
    """
    import mindspore as ms

    from model.checkpoint import check_destination
    from model.runtime import set_device

    from .step import AdamW, LossScale, TrainStep

    if cfg.run_mode == "eval":
        raise ConfigError("run() trains; use evaluate() for run_mode eval")
    if not cfg.data.dataset_dir:
        raise ConfigError("training needs data: pass --dataset_dir DIR (made by tools/prepare_data.py)")
    check_parallel(cfg)
    set_device(cfg.device_target)
    rank, world = init_distributed(cfg)
    out = Path(cfg.output_dir)
    is_main = rank == 0
    # Refused now rather than after training (the final model directory would replace what is there), and on
    # every rank: one rank exiting alone would leave the others waiting in the first collective.
    check_destination(out / "model", hint="move it away or choose another --output_dir")

    # The same seed on every process gives every process the same initial weights.
    ms.set_seed(cfg.seed)
    model = build_model(cfg)
    model.set_train(True)
    seq = cfg.data.seq_length
    train_rows = load_samples(cfg.data.dataset_dir, "train", seq_length=seq)
    val_rows = optional_split(cfg.data.dataset_dir, "validation", seq)

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

    start, skipped = 0, []
    if resume:
        start, skipped = _restore(manager, resume, model, optimizer, loss_scale, fingerprint)
    log = RunLogger(
        out, total_steps=t.max_steps, start_step=start, enabled=is_main, progress_bar=cfg.logging.progress_bar
    )
    if is_main:
        log.write(
            f"{cfg.run_mode}: {count_parameters(model):,} parameters, {len(train_rows):,} train samples of "
            f"{seq + 1} tokens, global batch {plan.global_batch} ({world} process(es) x {t.grad_accum_steps} "
            f"micro-steps x {t.batch_size}), steps {start} -> {t.max_steps}"
        )
        for path, why in skipped:
            log.write(f"--resume auto: skipped checkpoint {path}: {why}")
            log.log({"step": start, "event": "skipped_checkpoint", "path": str(path), "reason": why})
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


def _restore(
    manager: CheckpointManager, resume: bool | str, model, optimizer, loss_scale, fingerprint
) -> tuple[int, list[tuple[Path, str]]]:
    """Load the checkpoint `resume` names into the model and optimizer; (its step, damaged ones skipped)."""
    import mindspore as ms

    ckpt, tensors, meta, skipped = _load_for_resume(manager, resume)
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
    return int(meta["step"]), skipped


def _load_for_resume(manager: CheckpointManager, resume: bool | str):
    """(checkpoint, tensors, meta, skipped): the one named, or the newest (intact, for "auto")."""
    if resume == "auto":
        # Only unreadable or damaged checkpoints are skipped; changed settings are refused for every one.
        skipped: list[tuple[Path, str]] = []
        for ckpt in reversed(manager.list()):
            try:
                tensors, meta = ckpt.load()
            except CheckpointError as e:
                skipped.append((ckpt.path, str(e)))
                continue
            return ckpt, tensors, meta, skipped
        if not skipped:
            raise CheckpointError(f"--resume auto: no checkpoint in {manager.directory}")
        raise CheckpointError(f"--resume auto: no intact checkpoint in {manager.directory}: "
                              + "; ".join(why for _, why in skipped))
    if isinstance(resume, str):
        path = Path(resume)
        if not (path / "trainer_state.json").is_file():
            raise CheckpointError(f"{path} is not a checkpoint directory (no trainer_state.json)")
        ckpt = Checkpoint(path, -1)
    else:
        ckpt = manager.latest()
        if ckpt is None:
            raise CheckpointError(f"--resume: no checkpoint in {manager.directory}")
    try:
        tensors, meta = ckpt.load()
    except CheckpointError as e:
        raise CheckpointError(f"{e}; --resume auto resumes from the newest intact checkpoint instead "
                              "(or name one with --resume DIR)") from None
    return ckpt, tensors, meta, []
