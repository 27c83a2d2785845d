"""MindSpore's compile cache, as the server uses it (on by default): a cached graph is only ever reused for the
network it was compiled for, and one process at a time writes a cache directory.

MindSpore itself checks only the entry script's imports: before graph_cache_dir, a 3-layer model started on the
cache of a 2-layer one ran the 2-layer graph and answered wrong logits without an error."""

import fcntl
import subprocess
import sys

import numpy as np

from serving_helpers import REPO, make_tiny_model

STEP = """
import sys, numpy as np
from serving.engine.model_runner import load_session
cache = sys.argv[2] if sys.argv[2] != "-" else None
s = load_session(sys.argv[1], num_slots=2, max_seq_len=64, batch_buckets=(1, 2), chunk_buckets=(1, 8),
                 compile_cache_dir=cache)
out = s.step_flat(np.array([5, 6, 7], np.int32), np.arange(3, dtype=np.int32), np.zeros(3, np.int32), np.array([2]))
np.save(sys.argv[3], out)
"""


def _logits(model, cache, out) -> np.ndarray:
    script = out.with_suffix(".py")  # a script file: MindSpore's compile cache hashes the entry script's imports
    script.write_text(STEP)
    proc = subprocess.run([sys.executable, str(script), str(model), str(cache or "-"), str(out)], cwd=REPO,
                          timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.load(out)


def test_a_cached_graph_serves_only_its_own_architecture(tmp_path):
    small = make_tiny_model(tmp_path / "two-layers", **{"n-layer": 2, "seed": 1})
    big = make_tiny_model(tmp_path / "three-layers", **{"n-layer": 3, "seed": 1})
    cache = tmp_path / "graphs"
    _logits(small, cache, tmp_path / "a.npy")
    cached = _logits(big, cache, tmp_path / "b.npy")
    fresh = _logits(big, None, tmp_path / "c.npy")
    np.testing.assert_array_equal(cached, fresh)
    assert len([d for d in cache.iterdir() if d.is_dir()]) == 2  # one directory per architecture
    again = _logits(big, cache, tmp_path / "d.npy")  # read back from its own directory
    np.testing.assert_array_equal(again, fresh)


def test_a_cache_directory_in_use_is_left_to_its_owner(tmp_path):
    path = tmp_path / "graphs" / "net"
    path.parent.mkdir()
    code = "import sys; from model.runtime import enable_compile_cache as e; print(e(sys.argv[1]), e(sys.argv[1]))"
    with open(str(path) + ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        busy = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, check=True, capture_output=True,
                              text=True, timeout=120)
    free = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, check=True, capture_output=True,
                          text=True, timeout=120)
    assert busy.stdout.split() == ["False", "False"]
    assert free.stdout.split() == ["True", "True"]
