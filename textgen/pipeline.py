"""`pipeline("text_generation", model=..., max_length=...)`: prompt in, prompt plus continuation out.

    gen = pipeline("text_generation", model="gpt2", max_length=40)
    gen("I love Beijing, because", top_k=3)
    # -> [{'text_generation_text': ['I love Beijing, because ...']}]   (MindFormers' output shape)

Decoding runs on the model's compiled KV-cache `InferenceSession`. Greedy unless sampling is asked for:
`do_sample=True`, or any of `top_k`, `top_p`, `temperature` given (as in the MindFormers example, where
`top_k=3` alone samples). `temperature=0` is greedy. Generation stops at <|endoftext|> or the length limit.
For serving many users at once, use the HTTP server instead; this is a one-caller convenience.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from model.sampler import draw, filter_top_k_top_p_min_p

from .models import GPT2LMHeadModel, ensure_device, resolve_model_dir

TASKS = ("text_generation", "text-generation")
OUTPUT_KEY = "text_generation_text"


def pipeline(
    task: str = "text_generation",
    model: str | os.PathLike | Any = "gpt2",
    *,
    tokenizer: Any = None,
    max_length: int = 50,
    quantize: str | None = None,
    **defaults: Any,
) -> "TextGenerationPipeline":
    """A text-generation pipeline over a model directory, an embedded model name, or a loaded model.

    `max_length` counts prompt plus generated tokens (as in MindFormers and Hugging Face); `quantize="int8"` runs
    int8 weights (see GPT2LMHeadModel.from_pretrained); `defaults` are generation settings used when a call does
    not give them (top_k, top_p, temperature, do_sample, seed, ...).
    """
    if task not in TASKS:
        raise ValueError(f"unsupported task {task!r}; this package provides {', '.join(map(repr, TASKS))}")
    ensure_device()
    from tokenizer import GPT2Tokenizer

    if isinstance(model, (str, os.PathLike)):
        model_dir = resolve_model_dir(model)
        model = GPT2LMHeadModel.from_pretrained(model_dir, quantize=quantize)
        if tokenizer is None:
            tokenizer = _tokenizer_for(model_dir)
    if tokenizer is None:
        tokenizer = GPT2Tokenizer.from_pretrained("gpt2")
    elif quantize is not None:
        if quantize != "int8":
            raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
        model.quantize = quantize
    return TextGenerationPipeline(model, tokenizer, max_length=max_length, **defaults)


def _tokenizer_for(model_dir: os.PathLike):
    from tokenizer import GPT2Tokenizer

    try:
        return GPT2Tokenizer.from_pretrained(str(model_dir))
    except (FileNotFoundError, ValueError):
        return GPT2Tokenizer.from_pretrained("gpt2")  # a model directory without tokenizer files


class TextGenerationPipeline:
    def __init__(self, model: Any, tokenizer: Any, *, max_length: int = 50, **defaults: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.defaults = defaults
        self._session = None

    def __call__(
        self,
        inputs: str | Sequence[str],
        *,
        max_length: int | None = None,
        max_new_tokens: int | None = None,
        do_sample: bool | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float | None = None,
        seed: int | None = None,
    ) -> list[dict[str, list[str]]]:
        """One `{'text_generation_text': [text]}` per input, the text being prompt + continuation."""
        given = dict(
            max_length=max_length,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            top_k=top_k,
            top_p=top_p,
            temperature=temperature,
            seed=seed,
        )
        opts = {**self.defaults, **{k: v for k, v in given.items() if v is not None}}
        prompts = [inputs] if isinstance(inputs, str) else list(inputs)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("inputs must be a string or a non-empty list of strings")
        rng = np.random.default_rng(opts.get("seed"))
        results = []
        for prompt in prompts:
            ids = self.tokenizer.encode(prompt)
            new = self.generate_ids(ids, rng=rng, **{k: v for k, v in opts.items() if k != "seed"})
            results.append({OUTPUT_KEY: [prompt + self.tokenizer.decode(new)]})
        return results

    def generate_ids(
        self,
        prompt_ids: Sequence[int],
        *,
        rng: np.random.Generator,
        max_length: int | None = None,
        max_new_tokens: int | None = None,
        do_sample: bool | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float | None = None,
    ) -> list[int]:
        """The new token ids after `prompt_ids` (without the final <|endoftext|>)."""
        n_positions = self.model.config.n_positions
        if not prompt_ids:
            prompt_ids = [self.tokenizer.eos_token_id]  # an empty prompt starts a new document
        if max_new_tokens is None:
            max_new_tokens = (max_length or self.max_length) - len(prompt_ids)
        if len(prompt_ids) >= n_positions:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model takes at most {n_positions - 1}")
        max_new_tokens = min(max_new_tokens, n_positions - len(prompt_ids))
        if max_new_tokens <= 0:
            return []
        if do_sample is None:
            do_sample = any(v is not None for v in (top_k, top_p, temperature))
        if temperature is not None and temperature <= 0:
            do_sample = False  # temperature 0 means greedy
        _check_sampling(top_k, top_p, temperature)

        sess = self._get_session()
        eos = self.tokenizer.eos_token_id
        # Prefill in chunks no longer than the session's largest chunk bucket (a prompt may be longer).
        chunk = max(sess.chunk_buckets)
        for start in range(0, len(prompt_ids), chunk):
            piece = prompt_ids[start : start + chunk]
            logits = sess.step(
                np.asarray([piece], np.int32),
                np.arange(start, start + len(piece), dtype=np.int32)[None],
                np.zeros(1, np.int32),
                np.asarray([len(piece) - 1], np.int32),
            )[0]
        out: list[int] = []
        for i in range(max_new_tokens):
            tok = sample_token(logits, rng=rng, do_sample=do_sample, top_k=top_k, top_p=top_p, temperature=temperature)
            if tok == eos:
                break
            out.append(tok)
            if i + 1 == max_new_tokens:
                break
            pos = len(prompt_ids) + len(out) - 1
            logits = sess.step(
                np.asarray([[tok]], np.int32), np.asarray([[pos]], np.int32), np.zeros(1, np.int32), np.zeros(1, np.int32)
            )[0]
        return out

    def _get_session(self):
        if self._session is None:
            from model import InferenceSession

            n = self.model.config.n_positions
            # Few buckets: each compiles once (seconds); a short prompt padded to 64 costs little.
            chunks = sorted({1, min(64, n), min(512, n)})
            self._session = InferenceSession(self.model, num_slots=1, max_seq_len=n, batch_buckets=(1,),
                                             chunk_buckets=chunks, quantize=self.model.__dict__.get("quantize"))
        return self._session


def _check_sampling(top_k: int | None, top_p: float | None, temperature: float | None) -> None:
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if temperature is not None and temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")


def sample_token(
    logits: np.ndarray,
    *,
    rng: np.random.Generator,
    do_sample: bool,
    top_k: int | None = None,
    top_p: float | None = None,
    temperature: float | None = None,
) -> int:
    """Argmax, or a draw from softmax(logits / temperature) restricted to the top-k and then the nucleus top-p.

    The filtering and the draw are the server's (model.sampler), so the pipeline and the API sample alike.
    """
    if not do_sample:
        return int(np.argmax(logits))
    x = (np.asarray(logits, np.float32) / np.float32(temperature or 1.0))[None, :]
    x = filter_top_k_top_p_min_p(
        x, np.array([top_k or 0]), np.array([1.0 if top_p is None else top_p]), np.array([0.0])
    )
    return int(draw(x, rng.random(1))[0])
