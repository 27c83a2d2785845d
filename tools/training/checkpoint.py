"""Training checkpoints: written atomically, checksummed, the newest `keep` kept, the newest found again on resume.

A checkpoint is a directory `step_00000500/` holding `state.ckpt` (MindSpore checkpoint format: model
parameters under their own names, optimizer and loss-scale state under prefixed names, the RNG state) and
`trainer_state.json` (step, samples consumed, the settings a resume must not change, and the byte size and
sha256 of state.ckpt). It is written atomically (`model.atomic_write`: a temporary sibling directory, renamed),
so a directory with the final name is always complete; loading checks the size and checksum, so a file damaged
since is refused, naming it. A completed save removes the temporaries of every step that processes now gone
(killed mid-save) left behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.atomic_write import remove_stale_temporaries, write_atomically

_NAME = re.compile(r"^step_(\d{8})$")
# The temporaries of model.atomic_write for one step's directory (`.step_00000500.tmp-PID-XXXXXXXX`).
_TMP_NAME = re.compile(r"^\.(step_\d{8})\.(?:tmp|old)-")
STATE_FILE = "state.ckpt"
META_FILE = "trainer_state.json"
_HASH_CHUNK = 1 << 20

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, damaged or from an incompatible run."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int

    def read_meta(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / META_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read checkpoint {self.path}: {META_FILE}: {e}") from None

    def verify(self, meta: dict[str, Any] | None = None) -> bool:
        """Check each file's recorded size and sha256; CheckpointError naming the file and what differs.

        Returns False for a checkpoint written before checksums were recorded (nothing to check against).
        """
        files = (self.read_meta() if meta is None else meta).get("files")
        if not files:
            return False
        for name, want in files.items() if isinstance(files, dict) else [("files", None)]:
            path = self.path / name
            try:
                want_bytes, want_sha = int(want["bytes"]), str(want["sha256"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"checkpoint {self.path}: {META_FILE} has a malformed entry for {name}") from None
            try:
                size = path.stat().st_size
                if size != want_bytes:
                    raise CheckpointError(f"checkpoint file {path} is damaged: {size} bytes, "
                                          f"{want_bytes} recorded when it was written")
                digest = file_sha256(path)
            except OSError as e:
                raise CheckpointError(f"cannot read checkpoint file {path}: {e}") from None
            if digest != want_sha:
                raise CheckpointError(f"checkpoint file {path} is damaged: sha256 {digest[:16]}... differs from "
                                      f"{want_sha[:16]}... recorded when it was written (same size)")
        return True

    def load(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The tensors and metadata, after verify(); an old checkpoint without checksums loads with a warning."""
        import mindspore as ms

        meta = self.read_meta()
        if not self.verify(meta):
            log.warning("checkpoint %s has no recorded checksum (written before they were): loading it unverified",
                        self.path)
        try:
            params = ms.load_checkpoint(str(self.path / STATE_FILE))
        except (OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"cannot read checkpoint {self.path}: {e}") from None
        return {k: v.asnumpy() for k, v in params.items()}, meta


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, read in 1 MiB chunks (checkpoints are gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


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

        final = self.directory / f"step_{step:08d}"

        def write(tmp: str) -> None:
            items = [{"name": k, "data": v if isinstance(v, ms.Tensor) else ms.Tensor(v)} for k, v in tensors.items()]
            state = Path(tmp) / STATE_FILE
            ms.save_checkpoint(items, str(state))
            _fsync(state)
            # Hashed right after writing (from the page cache): damage from here on shows on load.
            files = {STATE_FILE: {"bytes": state.stat().st_size, "sha256": file_sha256(state)}}
            with open(Path(tmp) / META_FILE, "w", encoding="utf-8") as f:
                json.dump({**meta, "step": step, "files": files}, f, indent=2)
                f.flush()
                os.fsync(f.fileno())

        write_atomically(final, write, directory=True)
        for old in self.list()[: -self.keep]:
            shutil.rmtree(old.path, ignore_errors=True)
        self.remove_stale_temporaries()
        return final

    def remove_stale_temporaries(self) -> list[Path]:
        """Remove the temporaries of any step that processes now gone left (killed mid-save); returns them.

        A live process's are kept (another run may be saving into this directory); this process's own are stale
        unless still being written (a restarted container reuses PIDs).
        """
        entries = sorted(self.directory.iterdir()) if self.directory.is_dir() else []
        steps = sorted({m.group(1) for p in entries if (m := _TMP_NAME.match(p.name))})
        return [Path(p) for name in steps for p in remove_stale_temporaries(self.directory / name)]


def _fsync(path: Path) -> None:
    # MindSpore does not sync what it writes; the checksum should describe what is on disk.
    with open(path, "rb") as f:
        os.fsync(f.fileno())
