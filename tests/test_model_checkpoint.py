"""Model directories: save/load round trips, atomic writes, and clear errors for damaged weights."""

import os

import numpy as np
import pytest

from model.runtime import set_device
from model.checkpoint import load_model_dir, save_model_dir
from model_helpers import hf_logits, hf_model, our_config, our_model_from_hf

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def model_saved(tmp_path_factory):
    set_device("CPU")
    hf = hf_model(seed=1)
    ours = our_model_from_hf(hf)
    path = tmp_path_factory.mktemp("ckpt") / "m"
    save_model_dir(ours, path)
    return hf, ours, path


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_round_trip_is_exact(model_saved, tmp_path, fmt):
    from model import GPT2LMHeadModel
    from model.checkpoint import state_dict

    _, ours, _ = model_saved
    save_model_dir(ours, tmp_path / "m", weights_format=fmt)
    names = sorted(os.listdir(tmp_path / "m"))
    assert "config.json" in names and f"model.{fmt}" in names
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporary left behind
    loaded = load_model_dir(tmp_path / "m")
    assert loaded.config == ours.config
    a, b = state_dict(ours), state_dict(loaded)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_transformers_loads_our_model_directory(model_saved):
    import transformers

    hf, _, path = model_saved
    back = transformers.GPT2LMHeadModel.from_pretrained(path).eval()
    ids = np.array([[3, 14, 15, 92, 65]])
    np.testing.assert_array_equal(hf_logits(back, ids), hf_logits(hf, ids))


def test_save_replaces_an_existing_directory_atomically(model_saved, tmp_path, monkeypatch):
    import model.checkpoint as ckpt

    _, ours, _ = model_saved
    save_model_dir(ours, tmp_path / "m")
    before = sorted(os.listdir(tmp_path / "m"))

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "write_weights", boom)
    with pytest.raises(OSError, match="disk full"):
        save_model_dir(ours, tmp_path / "m")
    assert sorted(os.listdir(tmp_path / "m")) == before  # the old directory is untouched
    assert sorted(os.listdir(tmp_path)) == ["m"]  # and the temporary is gone


def test_tokenizer_files_are_copied(model_saved, tmp_path):
    _, ours, _ = model_saved
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "vocab.json").write_text("{}")
    (tok / "merges.txt").write_text("#version: 0.2\n")
    save_model_dir(ours, tmp_path / "m", tokenizer_dir=str(tok))
    assert (tmp_path / "m" / "vocab.json").read_text() == "{}"
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        save_model_dir(ours, tmp_path / "m2", tokenizer_dir=str(tmp_path))


def _damage(path, fn):
    from model.checkpoint import read_weights, write_weights

    f = os.path.join(path, "model.safetensors")
    state = read_weights(f)
    fn(state)
    write_weights(state, f)


@pytest.mark.parametrize("damage,match", [
    (lambda s: s.pop("transformer.h.1.mlp.c_fc.bias"), "missing tensors: transformer.h.1.mlp.c_fc.bias"),
    (lambda s: s.update({"transformer.h.2.ln_1.weight": np.ones(64, np.float32)}),
     "unexpected tensors: transformer.h.2.ln_1.weight"),
    (lambda s: s.update({"transformer.wpe.weight": np.ones((64, 64), np.float32)}),
     r"wrong shapes: transformer.wpe.weight: expected \(128, 64\), got \(64, 64\)"),
])
def test_mismatched_tensors_are_named(model_saved, tmp_path, damage, match):
    import shutil

    from model import GPT2LMHeadModel
    from model.checkpoint import CheckpointError

    _, _, path = model_saved
    shutil.copytree(path, tmp_path / "m")
    _damage(tmp_path / "m", damage)
    with pytest.raises(CheckpointError, match=match):
        load_model_dir(tmp_path / "m")


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_truncated_weights_file_is_a_clear_error(model_saved, tmp_path, fmt):
    from model import GPT2LMHeadModel
    from model.checkpoint import CheckpointError

    _, ours, _ = model_saved
    save_model_dir(ours, tmp_path / "m", weights_format=fmt)
    f = tmp_path / "m" / f"model.{fmt}"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"cannot read weights file .*model.{fmt}"):
        load_model_dir(tmp_path / "m")


def test_missing_directory_or_weights(tmp_path):
    from model import GPT2LMHeadModel

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model_dir(tmp_path / "nope")
    our_config().to_json(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="model.safetensors or model.ckpt"):
        load_model_dir(tmp_path)



def test_lazy_weights_read_what_safetensors_reads(tmp_path):
    # LazyWeights reads the format itself (no memory map): every dtype the project meets, against the library.
    import torch
    from safetensors.torch import save_file

    from model.checkpoint import LazyWeights

    rng = np.random.default_rng(0)
    tensors = {"f32": torch.from_numpy(rng.standard_normal((3, 5)).astype(np.float32)),
               "f16": torch.from_numpy(rng.standard_normal(7).astype(np.float16)),
               "bf16": torch.from_numpy(rng.standard_normal((2, 4)).astype(np.float32)).to(torch.bfloat16),
               "i8": torch.from_numpy(rng.integers(-127, 128, (4, 2)).astype(np.int8)),
               "empty": torch.zeros((0, 3))}
    path = str(tmp_path / "w.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    lazy = LazyWeights(path)
    assert lazy.shapes == {k: tuple(v.shape) for k, v in tensors.items()}
    for k, v in tensors.items():
        expected = v.float().numpy() if k == "bf16" else v.numpy()
        np.testing.assert_array_equal(lazy[k], expected)
        assert lazy[k].dtype == expected.dtype


@pytest.mark.parametrize("damage", ["header", "length", "offsets"])
def test_lazy_weights_refuse_a_damaged_file(tmp_path, damage):
    import json
    import struct

    from model.checkpoint import CheckpointError, LazyWeights

    header = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16 if damage != "offsets" else 12]}}
    raw = json.dumps(header).encode()
    if damage == "header":
        raw = raw[:-3]
    n = len(raw) if damage != "length" else 10**9
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", n) + raw + bytes(16))
    with pytest.raises(CheckpointError, match="cannot read weights file"):
        LazyWeights(str(path))
