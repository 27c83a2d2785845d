"""Int8 quantization end to end: the quantized directory format (tools/convert_weight.py --quantize
int8), an int8 InferenceSession against transformers running the same dequantized weights, the stored int8 weights
used as they are, batch invariance, the export back to transformers, and the Python API."""

import json

import numpy as np
import pytest

from model.runtime import set_device
from model_helpers import SESSION_KW, hf_logits, hf_model, our_model_from_hf, save_hf_dir, session_kernels_on

pytest.importorskip("torch")


# An int8 session runs the kernels' Q8 ops: with the kernels switched off (GPT2_CPU_KERNELS=0) it is refused with a
# ValueError that says so (test_int8_without_the_kernels_is_refused_by_name).
needs_kernels = pytest.mark.skipif(not session_kernels_on(), reason="int8 sessions need the CPU kernels")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from tools.convert_weight import convert

    root = tmp_path_factory.mktemp("q8")
    hf = hf_model(seed=6)
    src = save_hf_dir(hf, str(root / "hf"), fmt="safetensors")
    convert(src=src, dst=str(root / "float"))
    convert(src=src, dst=str(root / "int8"), quantize="int8")
    return hf, root


def _dequantized_hf(hf, qdir):
    # transformers' GPT-2 with the quantized directory's weights as float32: the independent reference
    import torch

    from model.checkpoint import read_weights
    from model.quantize import dequantize_state

    floats, _ = dequantize_state(read_weights(str(qdir / "model.safetensors")))
    ref = hf_model(seed=6)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(torch.from_numpy(floats[name]))
    return ref


def test_the_quantized_directory_records_int8_weights_and_scales(dirs):
    from safetensors.numpy import load_file

    hf, root = dirs
    cfg = json.loads((root / "int8" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "gpt2_int8_weight_only"
    state = load_file(str(root / "int8" / "model.safetensors"))
    w = hf.state_dict()["transformer.h.0.mlp.c_fc.weight"].numpy()  # Hugging Face layout [in, out]
    q, s = state["transformer.h.0.mlp.c_fc.weight"], state["transformer.h.0.mlp.c_fc.weight_scale"]
    assert q.dtype == np.int8 and q.shape == w.shape and s.shape == (w.shape[1],)
    # per output column of the HF layout (a row of [out, in]): max |w| maps to 127, each value within half a step
    np.testing.assert_allclose(s, np.abs(w).max(axis=0) / 127, rtol=1e-6)
    assert np.abs(q.astype(np.float32) * s - w).max() <= s.max() / 2 * 1.0001
    assert state["transformer.wte.weight"].dtype == np.int8 and state["transformer.ln_f.weight"].dtype == np.float32
    assert "transformer.wte.weight_scale" in state and "transformer.wpe.weight_scale" not in state


@needs_kernels
def test_an_int8_session_matches_transformers_on_the_dequantized_weights(dirs):
    from model import InferenceSession
    from model.checkpoint import load_model_dir

    hf, root = dirs
    set_device("CPU")
    model = load_model_dir(root / "int8")
    assert model.int8_weights is not None
    sess = InferenceSession(model, **SESSION_KW, quantize="int8")
    ids = np.random.default_rng(1).integers(0, 1000, 30).astype(np.int32)
    out = np.concatenate([sess.step_flat(ids[a:a + 16], np.arange(a, min(a + 16, 30), dtype=np.int32),
                                         np.zeros(min(16, 30 - a), np.int32), None) for a in (0, 16)])
    ref = hf_logits(_dequantized_hf(hf, root / "int8"), ids[None])[0]
    # what is left is each projection's rounding of its input rows to int16 (half a step of max|row| / 32,767)
    np.testing.assert_allclose(out, ref, atol=1e-4 * np.abs(ref).max())
    # ... and stays close to the float model itself (random weights: about 1% of the logits' scale)
    full = hf_logits(hf, ids[None])[0]
    assert np.abs(out - full).max() < 0.03 * np.abs(full).max()
    # A token's logits do not depend on what else is in the pass.
    alone = sess.step_flat(ids[:1], np.zeros(1, np.int32), np.ones(1, np.int32), None)
    np.testing.assert_array_equal(alone[0], out[0])


@needs_kernels
def test_stored_int8_weights_are_used_as_they_are(dirs):
    # Quantizing a float model at load and loading the directory quantized from it give the same bits.
    from model import InferenceSession
    from model.checkpoint import load_model_dir

    hf, root = dirs
    set_device("CPU")
    stored = InferenceSession(load_model_dir(root / "int8"), **SESSION_KW, quantize="int8", packed_weights=True)
    at_load = InferenceSession(load_model_dir(root / "float"), **SESSION_KW, quantize="int8")
    ids = np.arange(5, 25, dtype=np.int32)
    pos, slots = np.arange(20, dtype=np.int32), np.zeros(20, np.int32)
    np.testing.assert_array_equal(stored.step_flat(ids, pos, slots, None), at_load.step_flat(ids, pos, slots, None))
    assert stored.packed_form == "int8"


@needs_kernels
def test_release_frees_the_float_tables_and_the_session_still_runs(dirs):
    from model import InferenceSession
    from model.checkpoint import load_model_dir

    _, root = dirs
    set_device("CPU")
    model = load_model_dir(root / "int8")
    sess = InferenceSession(model, **SESSION_KW, quantize="int8")
    before = sess.step_flat(np.array([3, 4], np.int32), np.arange(2, dtype=np.int32), np.zeros(2, np.int32), None)
    sess.release_model_weights()
    assert model.transformer.wte.weight.shape == (0,) and model.int8_weights is None
    assert model.transformer.h[0].mlp.c_fc.weight.shape == (0,)
    after = sess.step_flat(np.array([3, 4], np.int32), np.arange(2, dtype=np.int32), np.ones(2, np.int32), None)
    np.testing.assert_array_equal(before, after)


def test_export_hf_writes_the_dequantized_weights_transformers_loads(dirs, tmp_path):
    import transformers

    from tools.convert_weight import export_hf

    hf, root = dirs
    export_hf(src=str(root / "int8"), dst=str(tmp_path / "out"))
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in cfg
    loaded = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "out")).eval()
    ids = np.arange(1, 21)[None]
    np.testing.assert_allclose(hf_logits(loaded, ids), hf_logits(_dequantized_hf(hf, root / "int8"), ids), atol=1e-6)


def test_refusals(dirs, tmp_path):
    from model import InferenceSession
    from tools.convert_weight import convert, main

    hf, root = dirs
    set_device("CPU")
    with pytest.raises(ValueError, match="quantize"):
        InferenceSession(our_model_from_hf(hf), **SESSION_KW, quantize="int4")
    with pytest.raises(ValueError, match="CPU kernels"):
        InferenceSession(our_model_from_hf(hf), **SESSION_KW, cpu_kernels=False, quantize="int8")
    with pytest.raises(ValueError, match="model directory"):
        convert(src=str(root / "hf"), dst=str(tmp_path / "w.safetensors"), quantize="int8")
    assert main(["--src", str(root / "hf"), "--dst", str(tmp_path / "x"), "--quantize", "int8"]) == 0
    # a damaged quantized directory: a scale missing
    from model.checkpoint import CheckpointError, load_model_dir, read_weights, write_weights

    state = read_weights(str(tmp_path / "x" / "model.safetensors"))
    del state["transformer.h.1.attn.c_proj.weight_scale"]
    write_weights(state, str(tmp_path / "x" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="transformer.h.1.attn.c_proj.weight"):
        load_model_dir(tmp_path / "x")


@needs_kernels
def test_textgen_quantize_runs_the_int8_session(dirs):
    from textgen import GPT2LMHeadModel, pipeline

    _, root = dirs
    set_device("CPU")
    m = GPT2LMHeadModel.from_pretrained(root / "float", quantize="int8")
    ids = m.generate([5, 6, 7], 6)
    assert m._generate_session.quantize == "int8"
    # the stored directory: int8 without asking, the same tokens (same quantized weights)
    assert GPT2LMHeadModel.from_pretrained(root / "int8").generate([5, 6, 7], 6) == ids
    gen = pipeline("text_generation", model=str(root / "float"), max_length=12, quantize="int8")
    gen.generate_ids([5, 6, 7], max_new_tokens=2, rng=np.random.default_rng(0))
    assert gen._get_session().quantize == "int8"


@needs_kernels
def test_the_server_serves_int8_and_its_tokens_are_the_python_apis(tmp_path):
    import httpx

    from serving_helpers import ServerProcess, make_tiny_model
    from textgen import GPT2LMHeadModel

    model = make_tiny_model(tmp_path / "tiny")
    server = ServerProcess(model, "--quantize", "int8", "--max-batch-size", "2", log_path=tmp_path / "server.log")
    try:
        server.wait_healthy(300)
        info = httpx.get(server.url + "/info").json()
        assert info["quantize"] == "int8"
        r = httpx.post(server.url + "/generate", json={"inputs": "Hello there, general", "parameters": {
            "max_new_tokens": 8, "details": True, "decoder_input_details": True}}, timeout=60)
        assert r.status_code == 200, r.text
        details = r.json()["details"]
        served = [t["id"] for t in details["tokens"]]
        prompt = [t["id"] for t in details["prefill"]]
    finally:
        server.stop()
    set_device("CPU")
    assert GPT2LMHeadModel.from_pretrained(model, quantize="int8").generate(prompt, 8) == served



def test_int8_without_the_kernels_is_refused_by_name(dirs, monkeypatch):
    from model import InferenceSession
    from model.checkpoint import load_model_dir

    _, root = dirs
    set_device("CPU")
    monkeypatch.setenv("GPT2_CPU_KERNELS", "0")
    with pytest.raises(ValueError, match="quantize='int8' needs the CPU kernels"):
        InferenceSession(load_model_dir(root / "int8"), **SESSION_KW, quantize="int8")
