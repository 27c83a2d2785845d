"""Training samples from tools/prepare_data.py's MindRecord files, in a reproducible order.

The order is a pure function of (seed, position): epoch e visits the samples in the permutation drawn from
`default_rng([seed, e])`, so a resumed run needs only the count of samples already consumed. Every process
computes the same global batch and takes its own rows of it; with equal-sized shards the mean of the
processes' mean losses is the mean loss of the global batch, which is what makes N processes match one.
The samples are read into memory (int32; a 100M-token corpus is 400 MB).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLITS = ("train", "validation")
COLUMN = "input_ids"


class DatasetError(ValueError):
    """A dataset directory or file that is missing, empty or of the wrong sample length."""


def split_path(dataset: str | os.PathLike, split: str) -> Path:
    """`dataset` is a directory made by prepare_data.py, or one .mindrecord file (used for every split)."""
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    path = Path(dataset)
    if path.is_file():
        return path
    if not path.is_dir():
        raise DatasetError(f"dataset {path} does not exist (make one with tools/prepare_data.py)")
    file = path / f"{split}.mindrecord"
    if not file.is_file():
        raise DatasetError(f"dataset {path} has no {split} split ({file.name} is missing)")
    return file


def load_samples(dataset: str | os.PathLike, split: str, *, seq_length: int | None = None) -> np.ndarray:
    """All samples of one split as an (n, seq_length + 1) int32 array."""
    from mindspore.mindrecord import FileReader

    file = split_path(dataset, split)
    reader = FileReader(str(file), num_consumer=1, columns=[COLUMN])
    try:
        rows = [np.asarray(r[COLUMN], dtype=np.int32) for r in reader.get_next()]
    finally:
        reader.close()
    if not rows:
        raise DatasetError(f"{file} holds no samples")
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise DatasetError(f"{file} mixes sample lengths {sorted(widths)}")
    width = widths.pop()
    if seq_length is not None and width != seq_length + 1:
        raise DatasetError(
            f"{file} holds samples of {width} tokens, but data.seq_length is {seq_length} "
            f"(samples must hold seq_length + 1 = {seq_length + 1}); "
            f"set --data.seq_length {width - 1} or prepare the data again"
        )
    return np.stack(rows)


def read_meta(dataset: str | os.PathLike) -> dict:
    path = Path(dataset) / "meta.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class BatchPlan:
    """Which rows of the data a process reads at each micro-step."""

    num_samples: int
    micro_batch: int  # rows per process per micro-step
    grad_accum_steps: int
    world_size: int
    rank: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum_steps * self.world_size

    def indices(self, step: int, micro: int) -> np.ndarray:
        """Sample indices for optimizer step `step`, micro-step `micro` of this process."""
        # Global batch rows are laid out as [micro-step][rank][row].
        start = step * self.global_batch + (micro * self.world_size + self.rank) * self.micro_batch
        return np.array([self._sample_at(p) for p in range(start, start + self.micro_batch)], dtype=np.int64)

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch / self.num_samples

    def _sample_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_samples)
        return int(_permutation(self.seed, epoch, self.num_samples)[offset])


_PERM_CACHE: dict[tuple[int, int, int], np.ndarray] = {}


def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    key = (seed, epoch, n)
    if key not in _PERM_CACHE:
        # Two epochs at most are live at a time (a batch can straddle a boundary).
        if len(_PERM_CACHE) >= 4:
            _PERM_CACHE.clear()
        _PERM_CACHE[key] = np.random.default_rng([seed, epoch]).permutation(n)
    return _PERM_CACHE[key]
