"""Data parallelism through msrun on CPU: 2 processes x batch 2 train the same model as 1 process x batch 4."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tools.prepare_data import prepare
from tools.training.runlog import read_log

REPO = Path(__file__).parents[1]
SONNETS = REPO / "tests" / "data" / "sonnets.txt"
TINY = "{n_layer: 2, n_embd: 32, n_head: 2, n_positions: 64, resid_pdrop: 0.0, embd_pdrop: 0.0, attn_pdrop: 0.0}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(dataset: Path, out: Path, batch: int, world: int) -> list[str]:
    return [
        "--device_target", "CPU", "--dataset_dir", str(dataset), "--output_dir", str(out),
        "--model.config", TINY, "--data.seq_length", "32", "--train.batch_size", str(batch),
        "--train.max_steps", "6", "--train.lr", "3e-3", "--train.warmup_steps", "2",
        "--eval.interval", "0", "--eval.max_batches", "2", "--checkpoint.interval", "0",
        "--logging.interval", "1", "--logging.progress_bar", "false", "--parallel.data_parallel", str(world),
    ]


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    dataset = tmp_path / "data"
    prepare(inputs=[SONNETS], output_dir=dataset, seq_length=32, val_fraction=0.1, progress=False)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("MS_WORKER_NUM", None)

    single = subprocess.run(
        [sys.executable, str(REPO / "tools" / "train.py"), *_args(dataset, tmp_path / "one", 4, 1)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]

    logs = tmp_path / "msrun"
    dp = subprocess.run(
        [str(Path(sys.executable).parent / "msrun"), "--worker_num=2", "--local_worker_num=2",
         f"--master_port={_free_port()}", f"--log_dir={logs}", "--join=True", "--cluster_time_out=300",
         str(REPO / "tools" / "train.py"), *_args(dataset, tmp_path / "two", 2, 2)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    worker_logs = {p.name: p.read_text(errors="replace") for p in logs.glob("worker_*.log")}
    assert dp.returncode == 0, "\n".join(f"== {k}\n{v[-3000:]}" for k, v in worker_logs.items())

    # Identical weights on both processes.
    digests = [re.findall(r"rank (\d) of 2: final weights sha256 ([0-9a-f]{64})", text) for text in worker_logs.values()]
    assert sorted(d[0][0] for d in digests) == ["0", "1"]
    assert len({d[0][1] for d in digests}) == 1

    # The same loss at every step as the single process with the same global batch.
    one = {r["step"]: r["loss"] for r in read_log(tmp_path / "one" / "train_log.jsonl") if "loss" in r}
    two = {r["step"]: r["loss"] for r in read_log(tmp_path / "two" / "train_log.jsonl") if "loss" in r}
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-4), (step, one, two)
    assert (tmp_path / "two" / "model" / "model.safetensors").is_file()
