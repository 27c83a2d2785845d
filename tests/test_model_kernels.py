"""model.kernels: the CPU kernels build here, agree with MindSpore's ops, keep rows independent, and fall back."""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from model_helpers import SESSION_KW, TINY, hf_model, our_model_from_hf, prompts, setup_device

pytest.importorskip("torch")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sessions():
    from model import InferenceSession

    setup_device()
    ours = our_model_from_hf(hf_model(seed=3))
    # Each session compiles its graphs on first use with the kernel setting it was made with: use each at once.
    kern = InferenceSession(ours, **SESSION_KW, cpu_kernels=True)
    kern.step(np.array([[1]]), np.array([[0]]), np.array([0]), np.array([0]))
    plain = InferenceSession(ours, **SESSION_KW, cpu_kernels=False)
    plain.step(np.array([[1]]), np.array([[0]]), np.array([0]), np.array([0]))
    return kern, plain


def test_library_builds_on_this_machine():
    from model import kernels

    assert kernels.library_path() is not None  # the project's machines have a C compiler


def test_without_a_compiler_the_model_falls_back(monkeypatch, tmp_path):
    from model import kernels

    kernels.library_path.cache_clear()
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv(kernels.ENV_CACHE, str(tmp_path / "cache"))
    try:
        assert kernels.library_path() is None
        assert not list((tmp_path / "cache").glob("*.so"))  # nothing half-written
    finally:
        kernels.library_path.cache_clear()


def test_switched_off_by_environment(monkeypatch):
    import mindspore as ms

    from model import GPT2Config, kernels

    setup_device()
    cfg = GPT2Config(**TINY)
    assert kernels.available(cfg, ms.float32)
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    assert not kernels.available(cfg, ms.float32)
    assert not kernels.available(GPT2Config(**{**TINY, "n_embd": 72, "n_head": 4}), ms.float32)  # unaligned


def test_kernel_and_mindspore_steps_agree_with_padding_and_chunks(sessions):
    kern, plain = sessions
    ps = prompts(seed=7, lengths=(20, 7, 13))
    ids = np.zeros((3, 20), np.int64)
    pos = np.full((3, 20), -1)
    for i, p in enumerate(ps):
        ids[i, : len(p)] = p
        pos[i, : len(p)] = np.arange(len(p))
    slots = np.array([3, 0, 2])
    a = kern.step(ids, pos, slots, None)
    b = plain.step(ids, pos, slots, None)
    for i, p in enumerate(ps):
        assert np.abs(a[i, : len(p)] - b[i, : len(p)]).max() < 1e-4
    nxt = np.array([[5], [6], [7]])
    at = np.array([[20], [7], [13]])
    last = np.zeros(3, int)
    assert np.abs(kern.step(nxt, at, slots, last) - plain.step(nxt, at, slots, last)).max() < 1e-4


def test_a_rows_logits_do_not_depend_on_the_batch(sessions):
    # The kernels compute every output element the same way whatever the number of rows (bitwise), here the
    # one-row graph against the four-row graph.
    kern, _ = sessions
    p = prompts(seed=8, lengths=(9,))[0]
    kern.step(np.array([p]), np.arange(9)[None], np.array([1]), np.array([8]))
    kern.step(np.array([p]), np.arange(9)[None], np.array([2]), np.array([8]))
    alone = kern.step(np.array([[11]]), np.array([[9]]), np.array([1]), np.array([0]))
    together = kern.step(np.array([[11], [12]]), np.array([[9], [9]]), np.array([2, 3]), np.zeros(2, int))
    assert np.array_equal(alone[0], together[0])


def test_a_second_model_works_after_the_first_is_freed():
    # Regression: MindSpore unloads a Custom op's library with the last graph using it; the kernels' worker
    # threads must survive that (it crashed the process).
    script = textwrap.dedent(
        """
        import gc, numpy as np
        from model.runtime import set_device
        from model import GPT2Config, GPT2LMHeadModel, InferenceSession
        set_device("CPU")
        for k in range(2):
            m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=64, vocab_size=100, n_positions=64))
            s = InferenceSession(m, num_slots=2, max_seq_len=64, cpu_kernels=True)
            for i in range(3):
                out = s.step(np.array([[5]]), np.array([[i]]), np.array([0]), np.zeros(1, np.int32))
            assert np.isfinite(out).all()
            del m, s
            gc.collect()
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
