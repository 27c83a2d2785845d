"""What a training run reports: a console progress bar, a JSONL log, and a loss-curve PNG at the end.

Only the process of rank 0 reports; the others pass `enabled=False`. A resumed run keeps the log up to its
checkpoint's step and appends to it, so the log and the curve cover the whole run once.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm


class RunLogger:
    def __init__(
        self,
        output_dir: str | os.PathLike,
        *,
        total_steps: int,
        start_step: int = 0,
        enabled: bool = True,
        progress_bar: bool = True,
    ) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / "train_log.jsonl"
        self._file = None
        self._bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            # A fresh run starts a new log; a resumed one drops what was logged after its checkpoint.
            kept = [r for r in read_log(self.path) if r.get("step", 0) <= start_step] if start_step else []
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        self._file = open(self.path, "a", encoding="utf-8")
        self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, disable=not progress_bar)
        self._start = time.time()

    def log(self, record: dict[str, Any], *, console: bool = False) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if console:
            fields = " ".join(f"{k} {_fmt(v)}" for k, v in record.items() if k != "time")
            self.write(fields)

    def advance(self, steps: int, **postfix: Any) -> None:
        if self.enabled:
            self._bar.update(steps)
            if postfix:
                self._bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)

    def write(self, text: str) -> None:
        """A console line that does not break the progress bar."""
        if self.enabled:
            if self._bar.disable:
                print(text, flush=True)
            else:
                self._bar.write(text)

    def close(self) -> None:
        if self.enabled:
            self._bar.close()
            self._file.close()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss_curve(log_path: str | os.PathLike, png_path: str | os.PathLike) -> None:
    """Training loss (and validation loss where logged) against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and math.isfinite(r["loss"])]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
