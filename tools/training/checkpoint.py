"""Training checkpoints: written atomically, the newest `keep` kept, the newest found again on resume.

A checkpoint is a directory `step_00000500/` holding `state.ckpt` (MindSpore checkpoint format: model
parameters under their own names, optimizer and loss-scale state under prefixed names, the RNG state) and
`trainer_state.json` (step, samples consumed, the settings a resume must not change). It is written as
`.tmp-step_00000500/` and renamed, so a directory with the final name is always complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_NAME = re.compile(r"^step_(\d{8})$")
STATE_FILE = "state.ckpt"
META_FILE = "trainer_state.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or from an incompatible run."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int

    def load(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        import mindspore as ms

        try:
            params = ms.load_checkpoint(str(self.path / STATE_FILE))
            meta = json.loads((self.path / META_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"cannot read checkpoint {self.path}: {e}") from None
        return {k: v.asnumpy() for k, v in params.items()}, meta


class CheckpointManager:
    def __init__(self, directory: str | os.PathLike, *, keep: int = 3) -> None:
        if keep <= 0:
            raise ValueError(f"keep must be positive, got {keep}")
        self.directory = Path(directory)
        self.keep = keep

    def list(self) -> list[Checkpoint]:
        if not self.directory.is_dir():
            return []
        found = []
        for p in self.directory.iterdir():
            m = _NAME.match(p.name)
            if m and (p / META_FILE).is_file():
                found.append(Checkpoint(p, int(m.group(1))))
        return sorted(found, key=lambda c: c.step)

    def latest(self) -> Checkpoint | None:
        found = self.list()
        return found[-1] if found else None

    def save(self, step: int, tensors: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Write `tensors` (name -> MindSpore Tensor or numpy array) and `meta` for optimizer step `step`."""
        import mindspore as ms

        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"step_{step:08d}"
        tmp = self.directory / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            items = [{"name": k, "data": v if isinstance(v, ms.Tensor) else ms.Tensor(v)} for k, v in tensors.items()]
            ms.save_checkpoint(items, str(tmp / STATE_FILE))
            with open(tmp / META_FILE, "w", encoding="utf-8") as f:
                json.dump({**meta, "step": step}, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for old in self.list()[: -self.keep]:
            shutil.rmtree(old.path, ignore_errors=True)
        return final
