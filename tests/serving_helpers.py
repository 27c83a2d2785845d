"""Test doubles for the serving tests: a byte-level fake tokenizer and a numpy fake of `InferenceSession`.

The fake session keeps a real per-slot token cache and makes each position's logits a function of the whole
cached prefix of its slot, so an engine that feeds the wrong slot, position or token produces different text.
Greedy output is predictable with `fake_greedy`.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
import numpy as np

from serving.config import EngineConfig, ModelInfo, Settings
from serving.engine import EngineParts, ModelRunner

EOS = 256
VOCAB = 257
_MOD = 1_000_003


class FakeTokenizer:
    """One token per UTF-8 byte (ids 0-255) plus <|endoftext|> = 256."""

    eos_token_id = EOS
    vocab_size = VOCAB

    def encode(self, text: str, *, allowed_special=frozenset()) -> list[int]:
        out: list[int] = []
        parts = text.split("<|endoftext|>")
        if len(parts) > 1 and allowed_special != "all":
            raise ValueError("special token text <|endoftext|> is not allowed")
        for k, part in enumerate(parts):
            if k:
                out.append(EOS)
            # Lone surrogates become U+FFFD, as in the real tokenizer.
            out.extend(re.sub("[\ud800-\udfff]", "\ufffd", part).encode("utf-8"))
        return out

    def token_bytes(self, token_id: int) -> bytes:
        return b"<|endoftext|>" if token_id == EOS else bytes([token_id])

    def decode(self, ids: Sequence[int], *, errors: str = "replace") -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors=errors)


def _prefix_hash(tokens: np.ndarray) -> int:
    # Depends on every token and its position.
    h = 0
    for p, t in enumerate(tokens.tolist()):
        h = (h * 31 + (t + 1) * (p + 7)) % _MOD
    return h


def next_target(prefix: Sequence[int], eos_every: int = 0) -> int:
    """The fake model's greedy choice after `prefix`: a lowercase letter, or EOS when the hash says so."""
    h = _prefix_hash(np.asarray(prefix))
    if eos_every and h % eos_every == 0:
        return EOS
    return 97 + h % 26


def fake_logits(prefix: Sequence[int], eos_every: int = 0) -> np.ndarray:
    target = next_target(prefix, eos_every)
    v = np.arange(VOCAB, dtype=np.float32)
    logits = -0.5 * np.abs(v - target)
    if target != EOS:
        logits[EOS] = -20.0
    else:
        logits[EOS] = 5.0
    return logits


def fake_greedy(prompt: Sequence[int], n: int, eos_every: int = 0, *, stop_at_eos: bool = True) -> list[int]:
    seq, out = list(prompt), []
    for _ in range(n):
        t = next_target(seq, eos_every)
        out.append(t)
        seq.append(t)
        if t == EOS and stop_at_eos:
            break
    return out


class FakeSession:
    """Implements `InferenceSession.step`'s contract in numpy (plus checks of the arguments)."""

    def __init__(self, num_slots: int, max_seq_len: int, *, eos_every: int = 0, delay: float = 0.0,
                 fail: Callable[[np.ndarray, np.ndarray], None] | None = None) -> None:
        self.num_slots = num_slots
        self.max_seq_len = max_seq_len
        self.vocab_size = VOCAB
        self.eos_every = eos_every
        self.delay = delay
        self.fail = fail
        self.cache = np.full((num_slots, max_seq_len), -1, np.int64)
        self.calls: list[tuple[int, int, bool]] = []  # step_flat: (tokens, sequences, all_logits)
        self.copies: list[tuple[int, int, int]] = []  # copy_prefix: (src, dst, tokens)
        self.lock = threading.Lock()

    can_copy_prefix = True

    def copy_prefix(self, src_slot: int, dst_slot: int, n: int) -> None:
        """`InferenceSession.copy_prefix`: the first n positions' tokens stand for their K/V."""
        assert 0 <= n <= self.max_seq_len and (self.cache[src_slot, :n] >= 0).all(), "copying unwritten rows"
        with self.lock:
            self.copies.append((src_slot, dst_slot, n))
        self.cache[dst_slot, :n] = self.cache[src_slot, :n]

    def step_flat(self, token_ids, positions, slot_ids, logits_index):
        """`InferenceSession.step_flat`: several sequences' tokens in one flat pass (a sequence's adjacent)."""
        ids, pos, slots = np.asarray(token_ids), np.asarray(positions), np.asarray(slot_ids)
        n = ids.size
        assert ids.shape == pos.shape == slots.shape == (n,) and n > 0
        assert ((pos >= 0) & (pos < self.max_seq_len)).all() and ((slots >= 0) & (slots < self.num_slots)).all()
        with self.lock:
            self.calls.append((n, len(set(slots.tolist())), logits_index is None))
        if self.fail is not None:
            self.fail(ids[None], pos[None])
        if self.delay:
            time.sleep(self.delay)
        self.cache[slots, pos] = ids
        out = np.zeros((n, VOCAB), np.float32)
        for i in range(n):
            prefix = self.cache[slots[i], : pos[i] + 1]
            assert (prefix >= 0).all(), "reading a position that was never written"
            out[i] = fake_logits(prefix, self.eos_every)
        return out if logits_index is None else out[np.asarray(logits_index)]


def fake_parts(config: EngineConfig, **session_kwargs) -> tuple[Callable[[], EngineParts], dict]:
    """A loader for AsyncEngine / create_app plus a dict that receives the session once loaded."""
    box: dict = {}

    def load() -> EngineParts:
        session = FakeSession(config.max_batch_size, config.max_total_tokens, **session_kwargs)
        box["session"] = session
        return EngineParts(ModelRunner(session, eos_token_id=EOS), FakeTokenizer())

    return load, box


FAKE_INFO = ModelInfo(n_positions=128, vocab_size=VOCAB, eos_token_id=EOS)


def fake_settings(**overrides) -> Settings:
    base = dict(max_batch_size=4, max_queue=8, prefill_chunk=16, warmup=False, served_model_name="fake-gpt2")
    base.update(overrides)
    return Settings(**base)


def parse_sse(lines: Sequence[str]) -> list[str]:
    """The `data` payloads of an SSE body given as lines (accepts `data:x` and `data: x`)."""
    out = []
    for line in lines:
        if line.startswith("data:"):
            payload = line[5:]
            out.append(payload[1:] if payload.startswith(" ") else payload)
        else:
            assert line == "" or line.startswith(":"), f"unexpected SSE line {line!r}"
    return out


# ---- a real server process (slow tests, benchmarks) -----------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def make_tiny_model(dst: Path, **overrides) -> Path:
    """A random tiny GPT-2 model directory, made by tools/init_model.py in a subprocess (MindSpore stays out of
    the test process: its device can only be set once per process)."""
    args = {"n-layer": 2, "n-embd": 64, "n-head": 4, "n-positions": 256, "init-std": 0.1, **overrides}
    cmd = [sys.executable, "-m", "tools.init_model", str(dst)]
    for k, v in args.items():
        cmd += [f"--{k}", str(v)]
    subprocess.run(cmd, cwd=REPO, check=True, timeout=600, capture_output=True)
    return dst


class ServerProcess:
    """`python -m serving ...` on 127.0.0.1 with a free port; the URL is read from its start-up banner."""

    def __init__(self, model_dir: Path, *args: str, log_path: Path, env: dict | None = None) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        cmd = [sys.executable, "-m", "serving", "--model", str(model_dir), "--host", "127.0.0.1", "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        self.url = self._wait_for_url(60)

    def _wait_for_url(self, timeout: float) -> str:
        t0 = time.time()
        while time.time() - t0 < timeout:
            m = re.search(r"on (http://127\.0\.0\.1:\d+)", self.log())
            if m:
                return m.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()}")
            time.sleep(0.1)
        raise TimeoutError(f"no URL printed:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, timeout: float = 300) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log()}")
            try:
                r = httpx.get(self.url + "/health", timeout=5)
                if r.status_code == 200:
                    return
                if "Loading" not in r.text:
                    raise RuntimeError(f"server unhealthy: {r.text}\n{self.log()[-3000:]}")
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"server not healthy after {timeout} s:\n{self.log()[-3000:]}")

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode
