"""Loading a model directory straight into a session's packed weights (load_model_dir(pack=), the server's load):
the projections are packed (or quantized) as each is read and their float parameters stay empty, and the session
computes the same bits as one made from a normally loaded model."""

import numpy as np
import pytest

from model.runtime import set_device
from model_helpers import SESSION_KW, hf_model, save_hf_dir

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from tools.convert_weight import convert

    root = tmp_path_factory.mktemp("packed")
    src = save_hf_dir(hf_model(seed=11), str(root / "hf"), fmt="safetensors")
    convert(src=src, dst=str(root / "float"))
    convert(src=src, dst=str(root / "ckpt"), weights_format="ckpt")
    convert(src=src, dst=str(root / "int8"), quantize="int8")
    return root


def _logits(model, **kw):
    from model import InferenceSession

    ids, pos, slots = np.arange(7, 30, dtype=np.int32), np.arange(23, dtype=np.int32), np.zeros(23, np.int32)
    return InferenceSession(model, **SESSION_KW, packed_weights=True, **kw).step_flat(ids, pos, slots, None)


def test_pack_panels_kn_is_pack_panels_of_the_transpose():
    from model import kernels

    if kernels.library_path() is None:
        pytest.skip("the CPU kernels do not build here")
    rng = np.random.default_rng(0)
    for k, n in ((64, 256), (37, 50), (3, 1)):  # whole panels, a partial last panel, less than one panel
        w = rng.standard_normal((k, n)).astype(np.float32)
        np.testing.assert_array_equal(kernels.pack_panels_kn(w), kernels.pack_panels(w.T))
        for form in ("panels", "amx") if k % 32 == 0 else ("panels",):
            np.testing.assert_array_equal(kernels.pack_weight(w, form, kn=True), kernels.pack_weight(w.T, form))


@pytest.mark.parametrize("src", ["float", "ckpt"])
def test_a_packed_load_gives_the_same_session_without_the_float_weights(dirs, src):
    from model import kernels
    from model.checkpoint import load_model_dir

    set_device("CPU")
    full = load_model_dir(dirs / src)
    form = kernels.packed_form(full.config, full.compute_dtype)
    if form is None:
        pytest.skip("the CPU kernels do not build here")
    lean = load_model_dir(dirs / src, pack=form)
    assert lean.transformer.h[1].attn.c_attn.weight.shape == (0,)
    assert sorted(lean.packed_weights) == sorted(
        proj.weight.name for block in lean.transformer.h for proj in block.projections())
    assert lean.transformer.wte.weight.shape == full.transformer.wte.weight.shape  # the embedding stays float
    np.testing.assert_array_equal(_logits(lean), _logits(full))
    assert lean.packed_weights == {}  # the session took them: not held twice
    with pytest.raises(ValueError, match="loaded packed"):
        _logits(load_model_dir(dirs / src, pack=form), quantize="int8")


@pytest.mark.parametrize("src", ["float", "int8", "ckpt"])
def test_an_int8_load_gives_the_same_session_without_the_float_weights(dirs, src):
    # Each weight quantized (or read int8) as it is read, its float parameter left empty.
    from model import kernels
    from model.checkpoint import load_model_dir

    set_device("CPU")
    full = load_model_dir(dirs / src)
    if not kernels.available(full.config, full.compute_dtype):
        pytest.skip("the CPU kernels do not build here")
    lean = load_model_dir(dirs / src, pack="int8")
    assert lean.transformer.h[1].attn.c_attn.weight.shape == (0,) and lean.transformer.wte.weight.shape == (0,)
    assert lean.transformer.wpe.weight.shape == (128, 64)  # not quantized: loaded as usual
    np.testing.assert_array_equal(_logits(lean, quantize="int8"), _logits(full, quantize="int8"))
    with pytest.raises(ValueError, match="loaded packed"):
        _logits(load_model_dir(dirs / src, pack="int8"))


# ---- the packed cache (model.packed_cache): a later load maps the packed projections from a file -------------


def _model_copy(dirs, tmp_path):
    # (a copy of the float model directory, its float model, the packed form here); skips without the kernels
    import shutil

    from model import kernels
    from model.checkpoint import load_model_dir

    set_device("CPU")
    model_dir = tmp_path / "model"
    shutil.copytree(dirs / "float", model_dir)
    full = load_model_dir(model_dir)
    form = kernels.packed_form(full.config, full.compute_dtype)
    if form is None:
        pytest.skip("the CPU kernels do not build here")
    return model_dir, full, form


def _mapped_from(path) -> list[tuple[int, int]]:
    # (start, end) of this process's mappings of `path` (/proc/self/maps)
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith(str(path)):
                a, b = line.split()[0].split("-")
                out.append((int(a, 16), int(b, 16)))
    return out


def test_the_cache_is_written_in_pieces_with_a_pause_before_each(tmp_path, monkeypatch):
    # The server's pause (wait for no request to run) comes before every piece: the file is the same as one
    # written in one go.
    from model import packed_cache

    monkeypatch.setenv(packed_cache.ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(packed_cache, "PIECE", 4096)
    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal((3, 1000)).astype(np.float32), "b": np.arange(5000, dtype=np.int32)}
    calls = []
    path = packed_cache.write("key-1", arrays, pause=lambda: calls.append(1))
    assert len(calls) == 3 + 5  # 12,000 and 20,000 bytes in pieces of 4,096
    got = packed_cache.load("key-1", {"a": (3, 1000), "b": (5000,)})
    assert got is not None and path is not None
    assert np.array_equal(got["a"], arrays["a"]) and np.array_equal(got["b"], arrays["b"])


def test_a_second_load_maps_the_packed_projections_from_the_cache(dirs, tmp_path, monkeypatch):
    import os

    from model import packed_cache
    from model.checkpoint import load_model_dir

    monkeypatch.setenv(packed_cache.ENV, str(tmp_path / "cache"))
    model_dir, full, form = _model_copy(dirs, tmp_path)
    first = load_model_dir(model_dir, pack=form)
    assert not list((tmp_path / "cache").glob("*.packed"))  # written only when asked (the server: once warm)
    packed_cache.write_pending(first).join()
    assert packed_cache.write_pending(first) is None  # once
    files = list((tmp_path / "cache").glob("*.packed"))
    assert len(files) == 1 and not list((tmp_path / "cache").glob(".*tmp*"))
    second = load_model_dir(model_dir, pack=form)
    assert packed_cache.write_pending(second) is None  # nothing to write: it came from the file
    # the second load's packed projections are the file's pages, not a copy
    spans = _mapped_from(files[0])
    for name, param in second.packed_weights.items():
        addr = param.asnumpy().ctypes.data
        assert any(a <= addr < b for a, b in spans), name
        np.testing.assert_array_equal(param.asnumpy(), first.packed_weights[name].asnumpy())
    got = _logits(second)  # (a model's packed weights go to one session)
    np.testing.assert_array_equal(got, _logits(first))
    np.testing.assert_array_equal(got, _logits(full))

    # A changed model file is another key: packed again (and written again), never the stale file.
    weights = model_dir / "model.safetensors"
    os.utime(weights, (weights.stat().st_atime, weights.stat().st_mtime + 5))
    third = load_model_dir(model_dir, pack=form)
    addr = next(iter(third.packed_weights.values())).asnumpy().ctypes.data
    assert not any(a <= addr < b for a, b in _mapped_from(files[0]))
    packed_cache.write_pending(third).join()
    assert len(list((tmp_path / "cache").glob("*.packed"))) == 2


def test_a_damaged_or_switched_off_cache_is_not_used(dirs, tmp_path, monkeypatch):
    from model import packed_cache
    from model.checkpoint import load_model_dir

    model_dir, full, form = _model_copy(dirs, tmp_path)
    want = _logits(full)
    monkeypatch.setenv(packed_cache.ENV, "0")
    assert packed_cache.write_pending(load_model_dir(model_dir, pack=form)) is None
    assert packed_cache.cache_dir() is None
    monkeypatch.setenv(packed_cache.ENV, str(tmp_path / "cache"))
    packed_cache.write_pending(load_model_dir(model_dir, pack=form)).join()
    (path,) = (tmp_path / "cache").glob("*.packed")
    with open(path, "r+b") as f:  # cut short: its tensors run past the end
        f.truncate(path.stat().st_size // 2)
    model = load_model_dir(model_dir, pack=form)
    assert not any(_mapped_from(path))
    np.testing.assert_array_equal(_logits(model), want)
    # A file under the right key with other weights in it (what a key that missed a change would find): the
    # first rows of each projection, packed from the weights file, tell them apart.
    key = path.stem
    path.unlink()
    packed_cache.write(key, {f"{n}.{form}": np.zeros_like(w.asnumpy()) for n, w in model.packed_weights.items()})
    other = load_model_dir(model_dir, pack=form)
    assert not any(_mapped_from(path))
    np.testing.assert_array_equal(_logits(other), want)


def test_the_cache_keeps_the_most_recently_used_files(tmp_path, monkeypatch):
    import os

    from model import packed_cache

    monkeypatch.setenv(packed_cache.ENV, str(tmp_path))
    a = {"w": np.arange(10, dtype=np.float32).reshape(2, 5)}
    for i in range(packed_cache.MAX_FILES + 2):
        path = packed_cache.write(f"key{i}", a)
        os.utime(path, (i, i))  # older first
    kept = sorted(p.name for p in tmp_path.glob("*.packed"))
    assert kept == [f"key{i}.packed" for i in range(2, packed_cache.MAX_FILES + 2)]
    got = packed_cache.load("key3", {"w": (2, 5)})
    np.testing.assert_array_equal(got["w"], a["w"])
    assert packed_cache.load("key3", {"w": (5, 2)}) is None and packed_cache.load("nokey", {"w": (2, 5)}) is None
    # a temporary file whose writer is gone (no lock on it) is removed; one a live writer holds is not
    import fcntl

    dead = tmp_path / ".key9.packed.tmp-0123"
    live = tmp_path / ".key8.packed.tmp-4567"
    dead.write_bytes(b"x")
    live.write_bytes(b"x")
    with open(live, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_SH)
        packed_cache.write("key10", a)
    assert not dead.exists() and live.exists()


def test_the_servers_loader_leaves_the_packed_cache_to_background_work(dirs, tmp_path, monkeypatch):
    # The server's load (serving.engine.loader) leaves the packed weights to background work that the engine
    # starts once it serves (writing between requests); a second server load maps them.
    import shutil

    from model import packed_cache
    from serving.config import EngineConfig, Settings
    from serving.engine.loader import model_dir_loader

    set_device("CPU")
    monkeypatch.setenv(packed_cache.ENV, str(tmp_path / "cache"))
    model_dir = tmp_path / "model"
    shutil.copytree(dirs / "float", model_dir)
    settings = Settings(model=str(model_dir), warmup=False, compile_cache="")
    config = EngineConfig(max_batch_size=2, max_total_tokens=64, max_batched_tokens=16, prefill_chunk=16)
    parts = model_dir_loader(settings, config)()
    if parts.runner.session.packed_form not in ("panels", "amx"):
        pytest.skip("the CPU kernels do not build here")
    assert not list((tmp_path / "cache").glob("*.packed"))  # nothing written before the engine serves
    pauses = []
    parts.background(lambda: pauses.append(1)).join(60)
    assert pauses  # the writer paused (for the engine to be idle) before its pieces
    (path,) = (tmp_path / "cache").glob("*.packed")
    assert not _mapped_from(path)
    again = model_dir_loader(settings, config)()
    assert _mapped_from(path)  # the second server's packed projections are the file's pages
    ids = np.array([5, 6, 7], np.int32)
    args = (ids, np.arange(3, dtype=np.int32), np.zeros(3, np.int32), None)
    np.testing.assert_array_equal(again.runner.session.step_flat(*args), parts.runner.session.step_flat(*args))


def test_a_deferred_load_packs_while_the_session_compiles_and_runs_and_then_computes_the_same_bits(
        dirs, tmp_path, monkeypatch):
    # The server's cold start: the packed Parameters exist before their memory is written, the session compiles
    # and runs warm-up steps meanwhile (held here until that has happened: packing waits for an event), and once
    # wait_packed returns, its steps are those of a model loaded the usual way. The cache file written afterwards
    # holds the packed bytes, not what the memory held when the load returned.
    import threading
    import time

    from model import InferenceSession, kernels, packed_cache
    from model.checkpoint import load_model_dir, wait_packed

    monkeypatch.setenv(packed_cache.ENV, str(tmp_path / "cache"))
    model_dir, full, form = _model_copy(dirs, tmp_path)
    if form != "panels":
        pytest.skip("deferred packing is for the float32 panels (this machine packs for AMX)")
    go, real = threading.Event(), kernels.pack_panels_kn
    want = _logits(full)

    def slow_pack(w, out=None):
        assert go.wait(120), "the step did not run in time"
        time.sleep(0.05)  # so that wait_packed has something to wait for
        return real(w, out=out)

    monkeypatch.setattr(kernels, "pack_panels_kn", slow_pack)
    lean = load_model_dir(model_dir, pack=form, defer_packing=True)
    fut = lean.packing
    assert not fut.done()
    ids, pos, slots = np.arange(7, 30, dtype=np.int32), np.arange(23, dtype=np.int32), np.zeros(23, np.int32)
    try:
        session = InferenceSession(lean, **SESSION_KW, packed_weights=True)
        session.step_flat(ids, pos, slots, None)  # compiled and run before any projection is packed
        assert not fut.done()
    finally:
        go.set()
    wait_packed(lean)
    assert fut.done() and fut.exception() is None and lean.packing is None
    np.testing.assert_array_equal(session.step_flat(ids, pos, slots, None), want)
    packed_cache.write_pending(lean).join()
    second = load_model_dir(model_dir, pack=form, defer_packing=True)
    assert second.packing is None  # from the cache file: nothing to pack
    np.testing.assert_array_equal(_logits(second), want)


def test_a_deferred_loads_error_is_raised_by_wait_packed(dirs, tmp_path, monkeypatch):
    from model import kernels, packed_cache
    from model.checkpoint import load_model_dir, wait_packed

    monkeypatch.setenv(packed_cache.ENV, "0")
    model_dir, _, form = _model_copy(dirs, tmp_path)
    if form != "panels":
        pytest.skip("deferred packing is for the float32 panels (this machine packs for AMX)")

    def broken(w, out=None):
        raise OSError("disk gone")

    monkeypatch.setattr(kernels, "pack_panels_kn", broken)
    model = load_model_dir(model_dir, pack=form, defer_packing=True)
    with pytest.raises(OSError, match="disk gone"):
        wait_packed(model)
