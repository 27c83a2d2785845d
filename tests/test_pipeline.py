"""textgen: model-name resolution, sampling, pipeline() and Trainer, and the README's Python API examples."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from textgen.models import DEFAULT_MODEL_DIR, resolve_model_dir
from textgen.pipeline import sample_token

REPO = Path(__file__).parents[1]
README = REPO / "README.md"


def test_model_names_resolve_to_the_embedded_model_or_a_clear_error(tmp_path):
    assert resolve_model_dir(tmp_path) == tmp_path
    with pytest.raises(FileNotFoundError, match="models are not downloaded"):
        resolve_model_dir("gpt2-medium")
    assert resolve_model_dir("gpt2") == DEFAULT_MODEL_DIR == REPO / "models" / "default"


def test_sampling_filters():
    logits = np.array([1.0, 3.0, 2.0, -1.0], np.float32)
    rng = np.random.default_rng(0)
    assert sample_token(logits, rng=rng, do_sample=False) == 1
    assert {sample_token(logits, rng=rng, do_sample=True, top_k=1) for _ in range(20)} == {1}
    assert {sample_token(logits, rng=rng, do_sample=True, top_p=0.1) for _ in range(20)} == {1}
    assert {sample_token(logits, rng=rng, do_sample=True, top_k=2) for _ in range(200)} == {1, 2}
    # top_p = 0.8: p = [.09, .67, .24, .01] sorted .67, .24 -> the mass before .24 is .67 < .8, so both stay.
    assert {sample_token(logits, rng=rng, do_sample=True, top_p=0.8) for _ in range(200)} == {1, 2}
    draws = [sample_token(logits, rng=rng, do_sample=True, temperature=100.0) for _ in range(400)]
    assert set(draws) == {0, 1, 2, 3}  # a high temperature flattens the distribution


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer model with random weights, saved as a model directory."""
    from textgen import GPT2Config, GPT2LMHeadModel
    from textgen import ensure_device

    ensure_device()
    out = tmp_path_factory.mktemp("tiny") / "model"
    import mindspore as ms

    ms.set_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64)).save_pretrained(out)
    return out


@pytest.mark.slow
def test_pipeline_greedy_matches_the_model_generate_and_validates_parameters(tiny_model_dir):
    from textgen import GPT2Tokenizer, pipeline

    tok = GPT2Tokenizer.from_pretrained("gpt2")
    gen = pipeline("text_generation", model=tiny_model_dir, max_length=12)
    prompt = "I love Beijing, because"
    out = gen(prompt)
    assert list(out[0]) == ["text_generation_text"] and out[0]["text_generation_text"][0].startswith(prompt)
    ids = tok.encode(prompt)
    expected = gen.model.generate(ids, 12 - len(ids), eos_token_id=tok.eos_token_id)
    if expected and expected[-1] == tok.eos_token_id:
        expected = expected[:-1]
    assert out[0]["text_generation_text"][0] == prompt + tok.decode(expected)
    # Seeded sampling repeats; a list of prompts gives one result each.
    a = gen(["one", "two"], top_k=5, seed=7)
    assert a == gen(["one", "two"], top_k=5, seed=7) and len(a) == 2
    with pytest.raises(ValueError, match="top_p must be in"):
        gen(prompt, top_p=1.5)
    with pytest.raises(ValueError, match="unsupported task"):
        pipeline("translation", model=tiny_model_dir)


@pytest.mark.slow
def test_pipeline_prefills_a_prompt_longer_than_its_largest_chunk(tmp_path):
    import mindspore as ms

    from textgen import GPT2Config, GPT2LMHeadModel
    from textgen import ensure_device, pipeline

    ensure_device()
    ms.set_seed(1)
    model_dir = tmp_path / "long"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=600)).save_pretrained(model_dir)
    gen = pipeline("text_generation", model=model_dir, max_length=600)
    ids = [int(i) for i in np.random.default_rng(0).integers(0, 50000, 530)]  # 512 + 18: two chunks
    got = gen.generate_ids(ids, rng=np.random.default_rng(0), max_new_tokens=4, do_sample=False)
    expected = gen.model.generate(ids, 4)
    assert got == expected[: len(got)] and len(got) >= 1


def _doc_examples() -> list[str]:
    text = README.read_text(encoding="utf-8")
    api = text[text.index("## Python API") :]
    api = api[: api.find("\n## ", 1)] if "\n## " in api[1:] else api
    return re.findall(r"```python\n(.*?)```", api, flags=re.S)


@pytest.mark.slow
def test_the_documented_api_examples_run_as_written(tmp_path, monkeypatch, capsys):
    examples = _doc_examples()
    assert len(examples) >= 3
    # The examples use paths relative to the repository root; run them in a scratch copy of that layout.
    (tmp_path / "tests").symlink_to(REPO / "tests")
    monkeypatch.chdir(tmp_path)
    for code in examples:
        exec(compile(code, str(README), "exec"), {"__name__": "__doc_example__"})
    out = capsys.readouterr().out
    assert "text_generation_text" in out and "I love Beijing, because" in out
