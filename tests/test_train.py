"""tools/train.py on a tiny GPT-2 and tests/data/sonnets.txt: loss falls, resume is exact, eval is the logits'.

The model is 2 layers, n_embd 32 (the GPT-2 vocabulary makes it 1.6M parameters); runs take seconds.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from model.checkpoint import load_model_dir

from tools.prepare_data import prepare
from tools.train import main as train_main
from tools.training.checkpoint import CheckpointError, CheckpointManager
from tools.training.config import ConfigError, load_config
from tools.training.data import load_samples
from tools.training.runlog import read_log

SONNETS = Path(__file__).parent / "data" / "sonnets.txt"
CONFIGS = Path(__file__).parents[1] / "configs" / "gpt2"
TINY = {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "sonnets-32"
    prepare(inputs=[SONNETS], output_dir=out, seq_length=32, val_fraction=0.1, progress=False)
    return out


def tiny_config(dataset: Path, output_dir: Path, **overrides):
    values = {
        "device_target": "CPU",
        "output_dir": str(output_dir),
        "model.preset": "gpt2",
        "model.config": TINY,
        "model.precision": "float32",
        "data.dataset_dir": str(dataset),
        "data.seq_length": 32,
        "train.batch_size": 4,
        "train.max_steps": 8,
        "train.lr": 3e-3,
        "train.min_lr": 3e-4,
        "train.warmup_steps": 2,
        "eval.interval": 4,
        "eval.max_batches": None,
        "eval.batch_size": 4,
        "checkpoint.interval": 3,
        "logging.interval": 1,
        "logging.progress_bar": False,
    }
    values.update(overrides)
    return load_config(None, values)


def losses(output_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(output_dir / "train_log.jsonl") if "loss" in r}


# ---- configs (fast) -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.model.preset.startswith("gpt2")
    assert len(path.read_text().splitlines()) < 80  # small and readable


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="unknown key train.learning_rate; valid keys in train: batch_size"):
        load_config(None, {"train.learning_rate": 1.0})
    with pytest.raises(ConfigError, match="train.batch_size must be int"):
        load_config(None, {"train.batch_size": "eight"})
    with pytest.raises(ConfigError, match="run_mode must be one of train, finetune, eval"):
        load_config(None, {"run_mode": "predict"})
    with pytest.raises(ConfigError, match="needs a model directory"):
        load_config(None, {"run_mode": "finetune"})
    with pytest.raises(ConfigError, match="bfloat16 does not run on CPU"):
        load_config(None, {"device_target": "CPU", "model.precision": "bfloat16"})


def test_command_line_overrides(tmp_path):
    from tools.training.config import parse_overrides

    assert parse_overrides(["--train.lr", "3e-4", "--model.config.n_layer=4", "--parallel.optimizer_shard", "true"]) == {
        "train.lr": "3e-4",
        "model.config.n_layer": 4,
        "parallel.optimizer_shard": True,
    }
    cfg = load_config(CONFIGS / "run_gpt2.yaml", parse_overrides(["--train.lr", "3e-4", "--model.config.n_layer=4"]))
    assert cfg.train.lr == 3e-4 and cfg.model.config == {"n_layer": 4}


def test_unimplemented_parallel_settings_are_refused(capsys):
    code = train_main(["--config", str(CONFIGS / "run_gpt2_13b.yaml"), "--dataset_dir", "/nonexistent"])
    assert code == 2
    assert "parallel.model_parallel=8 is not implemented (only data parallelism is)" in capsys.readouterr().err


def test_data_parallel_must_match_the_process_count(tmp_path, dataset, capsys):
    code = train_main(["--dataset_dir", str(dataset), "--output_dir", str(tmp_path), "--parallel.data_parallel", "2"])
    assert code == 2
    assert "parallel.data_parallel is 2 but 1 process(es) were started" in capsys.readouterr().err


def test_checkpoint_manager_keeps_the_newest(tmp_path):
    m = CheckpointManager(tmp_path, keep=2)
    for step in (3, 6, 9):
        m.save(step, {"w": np.full((2,), step, np.float32)}, {"note": "x"})
    assert [c.step for c in m.list()] == [6, 9]
    tensors, meta = m.latest().load()
    assert meta["step"] == 9 and tensors["w"].tolist() == [9.0, 9.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000006", "step_00000009"]


def _zero_in_place(path: Path, start: int, length: int) -> None:
    """Damage that keeps the size: bytes overwritten with zeros where the file holds something else."""
    data = path.read_bytes()
    assert any(data[start : start + length]), "choose a range that is not already zero"
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(b"\0" * length)
    assert path.stat().st_size == len(data)


def test_checkpoint_checksum_refuses_damaged_files(tmp_path, caplog):
    m = CheckpointManager(tmp_path, keep=3)
    w = np.random.default_rng(0).standard_normal(8192).astype(np.float32)  # 32 KB of tensor data
    m.save(3, {"w": w}, {})
    m.save(6, {"w": w + 1}, {})
    meta = json.loads((tmp_path / "step_00000006" / "trainer_state.json").read_text())
    state = tmp_path / "step_00000006" / "state.ckpt"
    assert meta["files"]["state.ckpt"]["bytes"] == state.stat().st_size
    assert len(meta["files"]["state.ckpt"]["sha256"]) == 64

    _zero_in_place(state, 8192, 4096)
    with pytest.raises(CheckpointError, match=f"checkpoint file {re.escape(str(state))} is damaged: sha256 .* differs"):
        m.latest().load()
    with open(state, "ab") as f:
        f.write(b"\0")
    size = meta["files"]["state.ckpt"]["bytes"]
    with pytest.raises(CheckpointError, match=f"{re.escape(str(state))} is damaged: {size + 1} bytes, {size} recorded"):
        m.latest().load()
    assert m.list()[0].load()[0]["w"].tolist() == w.tolist()  # the earlier one is intact

    # Checkpoints written before checksums were recorded still load, with a warning.
    old_meta = tmp_path / "step_00000003" / "trainer_state.json"
    old_meta.write_text(json.dumps({k: v for k, v in json.loads(old_meta.read_text()).items() if k != "files"}))
    with caplog.at_level("WARNING"):
        tensors, _ = m.list()[0].load()
    assert tensors["w"].tolist() == w.tolist() and "no recorded checksum" in caplog.text


def test_a_completed_save_removes_stale_temporaries(tmp_path):
    m = CheckpointManager(tmp_path)
    p = subprocess.Popen([sys.executable, "-c", ""])
    p.wait()  # reaped: its PID names no process now
    # Killed mid-save: a dead process's, and this PID's from an earlier run (containers reuse PIDs).
    stale = [f".step_00000002.tmp-{p.pid}-abcd1234", f".step_00000004.tmp-{os.getpid()}-abcd1234"]
    live = f".step_00000004.tmp-{os.getppid()}-abcd1234"  # another live process saving here: left alone
    for name in stale + [live]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "state.ckpt").write_bytes(b"\0" * 100)
    m.save(6, {"w": np.zeros(2, np.float32)}, {})
    assert sorted(q.name for q in tmp_path.iterdir()) == sorted([live, "step_00000006"])


# ---- training runs (slow) -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset):
    """One 30-step run shared by the tests below: (output directory, RunResult)."""
    from tools.training.trainer import run

    out = tmp_path_factory.mktemp("trained")
    cfg = tiny_config(dataset, out, **{"train.max_steps": 30, "logging.interval": 5, "eval.interval": 15})
    return out, run(cfg)


@pytest.mark.slow
def test_training_loss_falls_and_writes_a_servable_model(trained):
    from model import GPT2LMHeadModel

    out, result = trained
    curve = losses(out)
    assert curve[30] < curve[5] - 1.0, curve
    assert result.val_loss is not None and result.val_ppl == pytest.approx(math.exp(result.val_loss))
    records = read_log(out / "train_log.jsonl")
    assert any("val_loss" in r and r["step"] == 15 for r in records)
    assert all(r["tokens_per_s"] > 0 for r in records if "loss" in r)
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    model_dir = out / "model"
    assert result.model_dir == model_dir
    assert {"config.json", "model.safetensors", "encoder.json", "vocab.bpe"} <= {p.name for p in model_dir.iterdir()}
    m = load_model_dir(model_dir)
    assert m.config.n_layer == 2 and m.config.n_embd == 32


@pytest.mark.slow
def test_interrupted_and_resumed_run_matches_the_uninterrupted_one(tmp_path, dataset, capsys):
    from tools.training.trainer import run

    # With gradient accumulation, and across an epoch boundary (12 steps x 16 samples > 141 samples).
    common = {
        "train.max_steps": 12,
        "train.batch_size": 8,
        "train.grad_accum_steps": 2,
        "eval.interval": 0,
        "checkpoint.interval": 4,
    }
    full = run(tiny_config(dataset, tmp_path / "full", **common))
    stopped = run(tiny_config(dataset, tmp_path / "resumed", **common), stop_at_step=7)
    assert stopped.step == 7 and stopped.model_dir is None
    assert [c.step for c in CheckpointManager(tmp_path / "resumed" / "checkpoints").list()] == [4, 7]

    # The newest checkpoint damaged in place: --resume refuses it, naming the file; --resume auto goes back to
    # step 4, says so, and retraces steps 5-7 (saving step 7 again when stopped there).
    state = tmp_path / "resumed" / "checkpoints" / "step_00000007" / "state.ckpt"
    _zero_in_place(state, state.stat().st_size // 2, 1 << 16)
    with pytest.raises(CheckpointError, match=f"{re.escape(str(state))} is damaged: sha256 .*--resume auto"):
        run(tiny_config(dataset, tmp_path / "resumed", **common), resume=True)
    run(tiny_config(dataset, tmp_path / "resumed", **common), resume="auto", stop_at_step=7)
    console = capsys.readouterr().out
    assert f"--resume auto: skipped checkpoint {state.parent}: checkpoint file {state} is damaged" in console
    skips = [r for r in read_log(tmp_path / "resumed" / "train_log.jsonl") if r.get("event") == "skipped_checkpoint"]
    assert len(skips) == 1 and skips[0]["path"] == str(state.parent) and skips[0]["step"] == 4

    resumed = run(tiny_config(dataset, tmp_path / "resumed", **common), resume=True)
    a, b = losses(tmp_path / "full"), losses(tmp_path / "resumed")
    assert sorted(b) == list(range(1, 13))  # the resumed log continues the interrupted one
    for step in range(1, 13):
        assert b[step] == pytest.approx(a[step], abs=1e-4), step
    assert resumed.weights_digest == full.weights_digest
    assert resumed.val_loss == pytest.approx(full.val_loss, abs=1e-5)


def test_resume_refuses_a_changed_batch(tmp_path, dataset):
    from tools.training.trainer import run

    fingerprint = {"seed": 1234, "seq_length": 32, "global_batch": 4, "train_samples": 141, "precision": "float32"}
    CheckpointManager(tmp_path / "checkpoints").save(3, {"x": np.zeros(1, np.float32)}, {"fingerprint": fingerprint})
    with pytest.raises(CheckpointError, match="global_batch: 4 -> 8"):
        run(tiny_config(dataset, tmp_path, **{"train.max_steps": 6, "train.batch_size": 8}), resume=True)
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        run(tiny_config(dataset, tmp_path / "empty"), resume=True)


@pytest.mark.slow
def test_eval_perplexity_equals_a_direct_computation_from_the_logits(tmp_path, dataset, trained, capsys):
    import mindspore as ms

    from model import GPT2LMHeadModel
    from tools.training.trainer import evaluate

    model_dir = trained[0] / "model"
    # eval batches of 4 over 15 samples: the padded last batch must not count.
    report = evaluate(tiny_config(dataset, tmp_path, **{"run_mode": "eval", "model.pretrained": str(model_dir)}))

    samples = load_samples(dataset, "validation")
    model = load_model_dir(model_dir)
    model.set_train(False)
    nll, count = 0.0, 0
    for row in samples:
        logits = model(ms.Tensor(row[None, :-1], ms.int32)).asnumpy()[0].astype(np.float64)  # (T, V)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll -= (logits[np.arange(len(row) - 1), row[1:]] - logz).sum()
        count += len(row) - 1
    assert report.tokens == count == 15 * 32
    assert report.perplexity == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert report.unigram_perplexity is not None and report.unigram_perplexity > 1

    # The same from the command line.
    code = train_main(
        ["--run_mode", "eval", "--load_checkpoint", str(model_dir), "--dataset_dir", str(dataset),
         "--data.seq_length", "32", "--eval.max_batches", "null", "--device_target", "CPU"]
    )
    out = capsys.readouterr().out
    assert code == 0 and f"perplexity {report.perplexity:.2f}" in out and "unigram baseline perplexity" in out


@pytest.mark.slow
def test_finetune_starts_from_the_model_directory(tmp_path, dataset, trained):
    from tools.training.trainer import run

    base = trained[1]
    ft_cfg = tiny_config(
        dataset, tmp_path / "ft", **{"run_mode": "finetune", "model.pretrained": str(base.model_dir), "train.max_steps": 1,
                                     "train.lr": 1e-9, "train.min_lr": 0.0, "train.warmup_steps": 0}
    )
    ft = run(ft_cfg)
    # A (nearly) zero learning rate leaves the starting weights: finetuning did start from them.
    assert ft.val_loss == pytest.approx(base.val_loss, abs=1e-4)
    with open(ft.model_dir / "training.json") as f:
        assert json.load(f)["run_mode"] == "finetune"


@pytest.mark.slow
def test_float16_precision_trains_with_dynamic_loss_scaling(tmp_path, dataset):
    from tools.training.trainer import run

    cfg = tiny_config(dataset, tmp_path, **{"model.precision": "float16", "train.max_steps": 2, "eval.interval": 0})
    result = run(cfg)
    records = [r for r in read_log(tmp_path / "train_log.jsonl") if "loss" in r]
    assert [r["loss_scale"] for r in records] == [65536.0, 65536.0]
    assert all(math.isfinite(r["loss"]) for r in records) and math.isfinite(result.val_loss)
