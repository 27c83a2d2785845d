"""tools/convert_weight.py: Hugging Face and MindFormers checkpoints in, Hugging Face out, strict about keys."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from model.runtime import set_device
from model.checkpoint import load_model_dir
from model_helpers import TINY, hf_logits, hf_model, save_hf_dir

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model_hf():
    set_device("CPU")
    return hf_model(seed=3)


def _ours_logits(path, ids):
    import mindspore as ms

    from model import GPT2LMHeadModel

    m = load_model_dir(path)
    m.set_train(False)
    return m(ms.Tensor(np.asarray(ids, np.int32))).asnumpy()


def _batch():
    return np.random.default_rng(0).integers(0, TINY["vocab_size"], (3, 21))


@pytest.mark.parametrize("layout", [
    dict(fmt="bin"),
    dict(fmt="safetensors", prefix=False, buffers=True, lm_head=True),
    dict(fmt="bin", prefix=False, buffers=True),
])
def test_hf_directory_to_model_directory_matches_transformers(model_hf, tmp_path, layout):
    from tools.convert_weight import convert

    src = save_hf_dir(model_hf, str(tmp_path / "hf"), **layout)
    summary = convert(src=src, dst=str(tmp_path / "ours"))
    assert summary.tensors == 4 + 12 * TINY["n_layer"]
    assert summary.parameters == sum(p.numel() for p in model_hf.transformer.parameters())
    if layout.get("buffers"):
        assert len(summary.dropped["attention-mask buffers"]) == 2 * TINY["n_layer"]
    ids = _batch()
    assert np.abs(_ours_logits(tmp_path / "ours", ids) - hf_logits(model_hf, ids)).max() < 1e-4


def test_hf_to_ours_to_hf_round_trip_is_exact(model_hf, tmp_path):
    from tools.convert_weight import convert, export_hf

    src = save_hf_dir(model_hf, str(tmp_path / "hf"), fmt="bin")
    (tmp_path / "hf" / "vocab.json").write_text('{"a": 0}')
    (tmp_path / "hf" / "merges.txt").write_text("#version: 0.2\n")
    convert(src=src, dst=str(tmp_path / "ours"), weights_format="ckpt")
    assert (tmp_path / "ours" / "vocab.json").exists()  # tokenizer files travel along
    for fmt in ("safetensors", "bin"):
        out = tmp_path / f"back_{fmt}"
        export_hf(src=str(tmp_path / "ours"), dst=str(out), hf_format=fmt)
        back = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
        a, b = model_hf.state_dict(), back.state_dict()
        for k in a:
            if not k.endswith((".attn.bias", ".attn.masked_bias")):
                assert torch.equal(a[k], b[k]), k
        assert (out / "merges.txt").exists()


def _mindformers_state(hf):
    """The MindFormers GPT-2 layout, written from its documented name map (independently of the converter)."""
    sd = {k: v.numpy() for k, v in hf.transformer.state_dict().items()}
    out = {"backbone.layernorm.gamma": sd["ln_f.weight"], "backbone.layernorm.beta": sd["ln_f.bias"],
           "backbone.embedding.word_embedding.embedding_table": sd["wte.weight"],
           "backbone.embedding.position_embedding.embedding_table": sd["wpe.weight"],
           "adam_m.backbone.layernorm.gamma": np.zeros(64, np.float32), "global_step": np.array([10], np.int32)}
    for i in range(TINY["n_layer"]):
        h, b = f"h.{i}.", f"backbone.blocks.{i}."
        for ours, mf in (("ln_1", "layernorm1"), ("ln_2", "layernorm2")):
            out[b + mf + ".gamma"] = sd[h + ours + ".weight"]
            out[b + mf + ".beta"] = sd[h + ours + ".bias"]
        for n, (w, bias) in enumerate(zip(np.split(sd[h + "attn.c_attn.weight"], 3, -1),
                                          np.split(sd[h + "attn.c_attn.bias"], 3, -1)), start=1):
            out[b + f"attention.dense{n}.weight"] = np.ascontiguousarray(w.T)
            out[b + f"attention.dense{n}.bias"] = bias
        for ours, mf in (("attn.c_proj", "attention.projection"), ("mlp.c_fc", "output.mapping"),
                         ("mlp.c_proj", "output.projection")):
            out[b + mf + ".weight"] = sd[h + ours + ".weight"]
            out[b + mf + ".bias"] = sd[h + ours + ".bias"]
    return out


def test_mindformers_checkpoint_import(model_hf, tmp_path):
    import mindspore as ms

    from tools.convert_weight import convert

    state = _mindformers_state(model_hf)
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in state.items()], str(tmp_path / "mf.ckpt"))
    cfg = tmp_path / "config.json"
    model_hf.config.to_json_file(cfg)
    summary = convert(src=str(tmp_path / "mf.ckpt"), dst=str(tmp_path / "ours"), config=str(cfg))
    assert summary.source_format == "mindformers"
    assert len(summary.dropped["optimizer/training-state entries"]) == 2
    ids = _batch()
    assert np.abs(_ours_logits(tmp_path / "ours", ids) - hf_logits(model_hf, ids)).max() < 1e-4

    state.pop("backbone.blocks.1.attention.dense2.bias")
    state["backbone.blocks.0.attention.extra"] = np.zeros(3, np.float32)
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in state.items()], str(tmp_path / "bad.ckpt"))
    with pytest.raises(ValueError, match="unknown MindFormers keys: backbone.blocks.0.attention.extra"):
        convert(src=str(tmp_path / "bad.ckpt"), dst=str(tmp_path / "bad"), config=str(cfg))


def _run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_mindformers_command_line(model_hf, tmp_path):
    src = save_hf_dir(model_hf, str(tmp_path / "hf"), fmt="bin", prefix=False, buffers=True)
    out = tmp_path / "mindspore_gpt2.ckpt"
    r = _run("tools/convert_weight.py", "--layers", "2", "--torch_path", os.path.join(src, "pytorch_model.bin"),
             "--mindspore_path", str(out))
    assert r.returncode == 0, r.stderr
    assert "converted 28 tensors" in r.stdout and "dropped 4 attention-mask buffers" in r.stdout
    from model.checkpoint import read_weights

    state = read_weights(str(out))
    np.testing.assert_array_equal(state["transformer.h.1.attn.c_attn.weight"],
                                  model_hf.state_dict()["transformer.h.1.attn.c_attn.weight"].numpy())
    # Wrong --layers: exit status 1, a one-line message, no traceback, nothing written.
    r = _run("-m", "tools.convert_weight", "--layers", "12", "--torch_path", os.path.join(src, "pytorch_model.bin"),
             "--mindspore_path", str(tmp_path / "x.ckpt"))
    assert r.returncode == 1 and "--layers 12 does not match" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.ckpt").exists()


@pytest.mark.parametrize("damage,match", [
    ("truncate", "cannot read PyTorch checkpoint"),
    ("missing", "missing tensors: transformer.h.0.mlp.c_proj.weight"),
    ("extra", "unexpected tensors: transformer.h.0.attn.rotary"),
    ("shape", r"transformer.wte.weight: expected \(1000, 64\), got \(999, 64\)"),
    ("untied", "lm_head.weight differs"),
])
def test_damaged_sources_stop_the_conversion(model_hf, tmp_path, damage, match):
    from tools.convert_weight import convert

    src = save_hf_dir(model_hf, str(tmp_path / "hf"), fmt="bin")
    f = os.path.join(src, "pytorch_model.bin")
    if damage == "truncate":
        data = open(f, "rb").read()
        open(f, "wb").write(data[: len(data) // 3])
    else:
        sd = torch.load(f, weights_only=True)
        if damage == "missing":
            del sd["transformer.h.0.mlp.c_proj.weight"]
        elif damage == "extra":
            sd["transformer.h.0.attn.rotary"] = torch.zeros(2)
        elif damage == "shape":
            sd["transformer.wte.weight"] = sd["transformer.wte.weight"][:999]
        else:
            sd["lm_head.weight"] = torch.zeros_like(sd["transformer.wte.weight"])
        torch.save(sd, f)
    with pytest.raises(ValueError, match=match):
        convert(src=src, dst=str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # nothing half-written


def test_cli_user_errors_exit_nonzero_without_traceback(tmp_path):
    from tools.convert_weight import main

    assert main(["--src", str(tmp_path / "nope"), "--dst", str(tmp_path / "out")]) == 1
    with pytest.raises(SystemExit) as e:
        main(["--src", str(tmp_path)])  # no destination: argparse usage error
    assert e.value.code == 2


def test_weights_without_config_need_one_for_a_model_directory(model_hf, tmp_path):
    from tools.convert_weight import convert

    src = save_hf_dir(model_hf, str(tmp_path / "hf"), fmt="bin")
    with pytest.raises(ValueError, match="needs a config"):
        convert(src=os.path.join(src, "pytorch_model.bin"), dst=str(tmp_path / "out"))
    convert(src=os.path.join(src, "pytorch_model.bin"), dst=str(tmp_path / "out"), config=src)
    assert {"config.json", "model.safetensors"} <= set(os.listdir(tmp_path / "out"))


# ---- the destination: nothing lost, nothing half-written left behind ---------------------------------------

def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", ""])
    p.wait()  # reaped: its PID now names no process
    return p.pid


def test_a_directory_of_other_files_is_refused_unless_overwrite(model_hf, tmp_path, capsys):
    from tools.convert_weight import convert, export_hf, main

    src = save_hf_dir(model_hf, str(tmp_path / "hf"), fmt="bin")
    dst = tmp_path / "notes"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"not a model directory \(it holds notes.txt\); pass --overwrite"):
        convert(src=src, dst=str(dst))
    assert main(["--src", src, "--dst", str(dst)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: destination") and "--overwrite" in err and "Traceback" not in err
    assert main(["--export_hf", "--src", src, "--dst", str(dst)]) == 1
    assert [p.name for p in dst.iterdir()] == ["notes.txt"] and (dst / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["hf", "notes"]  # no temporary either
    with pytest.raises(FileExistsError, match="not a model directory"):
        export_hf(src=src, dst=str(dst))

    # --overwrite replaces it (atomically: the same writer as every other replacement).
    assert main(["--src", src, "--dst", str(dst), "--overwrite"]) == 0
    assert not (dst / "notes.txt").exists() and (dst / "model.safetensors").is_file()
    assert sorted(os.listdir(tmp_path)) == ["hf", "notes"]

    # An empty directory is a fine destination.
    (tmp_path / "empty").mkdir()
    convert(src=src, dst=str(tmp_path / "empty"))
    assert (tmp_path / "empty" / "config.json").is_file()


def test_a_model_directory_holding_other_files_and_the_source_itself_are_refused(model_hf, tmp_path):
    from tools.convert_weight import convert

    src = save_hf_dir(model_hf, str(tmp_path / "hf"), fmt="bin")
    (tmp_path / "hf" / "README.md").write_text("a Hugging Face checkout")
    before = sorted(os.listdir(src))
    # `--src hf/ --dst hf/` used to read the checkout, then replace all of it.
    with pytest.raises(ValueError, match="overlap"):
        convert(src=src, dst=src)
    with pytest.raises(ValueError, match="overlap"):
        convert(src=src, dst=str(tmp_path))
    # A model directory that also holds README.md is not replaced without --overwrite.
    weights = shutil.copy(os.path.join(src, "pytorch_model.bin"), tmp_path / "w.bin")
    config = shutil.copy(os.path.join(src, "config.json"), tmp_path / "config.json")
    with pytest.raises(FileExistsError, match="also holds README.md"):
        convert(src=str(weights), dst=src, config=str(config))
    assert sorted(os.listdir(src)) == before


def test_an_existing_model_directory_is_replaced_and_stale_temporaries_cleaned(model_hf, tmp_path):
    src = save_hf_dir(model_hf, str(tmp_path / "hf"), fmt="bin")
    dst = tmp_path / "ours"
    r = _run("tools/convert_weight.py", "--src", src, "--dst", str(dst))
    assert r.returncode == 0, r.stderr

    # What killed runs leave: temporaries of `ours` (a directory, the directory being replaced, a weights file
    # of `w.ckpt`, and an hour-old PID-less one of an earlier version), a live writer's, another destination's.
    dead, live = _dead_pid(), os.getpid()
    stale = [f".ours.tmp-{dead}-ab_cd123", f".ours.old-{dead}-x1y2z3w4", f".ours.tmp-k9l8m7n6.old"]
    for name in stale + [f".ours.tmp-{live}-abcdefgh", f".other.tmp-{dead}-abcdefgh"]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"\0" * 1000)
    (tmp_path / f".w.ckpt.tmp-{dead}-qwertyui.ckpt").write_bytes(b"\0" * 100)
    hour_ago = os.path.getmtime(tmp_path / stale[2]) - 7200
    for p in (tmp_path / stale[2], tmp_path / stale[2] / "model.safetensors"):
        os.utime(p, (hour_ago, hour_ago))

    # An existing model directory is replaced (not merged into): --format ckpt leaves no model.safetensors.
    r = _run("tools/convert_weight.py", "--src", src, "--dst", str(dst), "--format", "ckpt")
    assert r.returncode == 0, r.stderr
    assert "model.ckpt" in os.listdir(dst) and "model.safetensors" not in os.listdir(dst)
    for name in stale:
        assert f"removed stale temporary {tmp_path / name}" in r.stderr
    assert f"left by process {dead}, no longer running" in r.stderr
    r = _run("tools/convert_weight.py", "--src", src, "--dst", str(tmp_path / "w.ckpt"))
    assert r.returncode == 0 and "removed stale temporary" in r.stderr, r.stderr
    assert sorted(os.listdir(tmp_path)) == sorted([f".ours.tmp-{live}-abcdefgh", f".other.tmp-{dead}-abcdefgh",
                                                   "hf", "ours", "w.ckpt"])


def test_an_interrupted_replacement_is_restored_not_removed(tmp_path):
    from model.atomic_write import remove_stale_temporaries

    # Killed between its two renames: the old directory is aside, the new one complete, the name missing.
    dead = _dead_pid()
    (tmp_path / f".m.old-{dead}-aaaaaaaa").mkdir()
    (tmp_path / f".m.old-{dead}-aaaaaaaa" / "config.json").write_text("old")
    (tmp_path / f".m.tmp-{dead}-bbbbbbbb").mkdir()
    assert remove_stale_temporaries(tmp_path / "m") == [str(tmp_path / f".m.tmp-{dead}-bbbbbbbb")]
    assert os.listdir(tmp_path) == ["m"] and (tmp_path / "m" / "config.json").read_text() == "old"
