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
