"""GPT2Config: presets, Hugging Face config.json round trip, type and value checks."""

import json

import pytest

from model import PRESETS, GPT2Config


def test_presets_have_the_published_sizes():
    sizes = {name: (c.n_layer, c.n_head, c.n_embd, c.n_positions) for name, c in PRESETS.items()}
    assert sizes == {
        "gpt2": (12, 12, 768, 1024),
        "gpt2-medium": (24, 16, 1024, 1024),
        "gpt2-large": (36, 20, 1280, 1024),
        "gpt2-xl": (48, 25, 1600, 1024),
        "gpt2-13b": (40, 40, 5120, 2048),
    }
    assert GPT2Config.from_preset("gpt2").vocab_size == 50257
    assert GPT2Config.from_preset("gpt2", n_layer=2).n_layer == 2


def test_unknown_preset_lists_the_valid_names():
    with pytest.raises(ValueError) as e:
        GPT2Config.from_preset("gpt-2")
    for name in PRESETS:
        assert name in str(e.value)


def test_json_round_trip_keeps_unknown_keys(tmp_path):
    hf = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 3, "n_head": 2, "n_embd": 8,
          "n_positions": 16, "n_ctx": 16, "vocab_size": 50, "layer_norm_epsilon": 1e-5, "activation_function":
          "gelu_new", "task_specific_params": {"text-generation": {"do_sample": True}}, "resid_pdrop": 0}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    cfg = GPT2Config.from_json(tmp_path)  # a directory means its config.json
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.resid_pdrop) == (3, 2, 8, 0.0)
    cfg.to_json(tmp_path / "out.json")
    written = json.loads((tmp_path / "out.json").read_text())
    assert written["task_specific_params"] == hf["task_specific_params"]
    assert written["n_ctx"] == 16 and written["model_type"] == "gpt2"
    assert GPT2Config.from_json(tmp_path / "out.json") == cfg


def test_transformers_reads_our_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = GPT2Config.from_preset("gpt2-medium")
    cfg.to_json(tmp_path / "config.json")
    hf = transformers.GPT2Config.from_pretrained(tmp_path)
    assert (hf.n_layer, hf.n_head, hf.n_embd, hf.layer_norm_epsilon) == (24, 16, 1024, 1e-5)


@pytest.mark.parametrize("key,value", [("n_layer", "12"), ("n_head", 2.0), ("n_embd", True),
                                       ("layer_norm_epsilon", "1e-5"), ("scale_attn_weights", 1)])
def test_wrong_types_are_rejected_naming_the_key(key, value):
    with pytest.raises(TypeError, match=key):
        GPT2Config.from_dict({key: value})


def test_wrong_types_in_a_file_are_value_errors_naming_file_and_key(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"n_layer": "12"}))
    with pytest.raises(ValueError, match="n_layer.*str"):
        GPT2Config.from_json(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        GPT2Config.from_json(tmp_path)


@pytest.mark.parametrize("kw,match", [({"n_embd": 10, "n_head": 3}, "divisible"), ({"n_layer": 0}, "positive"),
                                      ({"activation_function": "relu"}, "gelu_new"),
                                      ({"attn_pdrop": 1.5}, r"\[0, 1\)")])
def test_bad_values_are_rejected(kw, match):
    with pytest.raises(ValueError, match=match):
        GPT2Config(**kw)


def test_untied_or_foreign_configs_are_rejected():
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        GPT2Config.from_dict({"tie_word_embeddings": False})
    with pytest.raises(ValueError, match="model_type"):
        GPT2Config.from_dict({"model_type": "llama"})
