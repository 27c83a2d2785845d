"""Validation loss and perplexity from the model's evaluation-mode logits, and a unigram baseline."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import ConfigError, RunConfig
from .data import DatasetError, load_samples, split_path
from .runtime import build_model, check_parallel


@dataclass
class EvalReport:
    loss: float  # mean next-token cross-entropy, nats
    perplexity: float
    tokens: int  # predicted tokens
    samples: int
    unigram_perplexity: float | None = None  # add-one unigram model fitted on the train split

    def format(self) -> str:
        text = f"eval: {self.samples} samples, {self.tokens} tokens, loss {self.loss:.4f}, perplexity {self.perplexity:.2f}"
        if self.unigram_perplexity is not None:
            text += f"\nunigram baseline perplexity (add-one, fitted on the train split): {self.unigram_perplexity:.2f}"
        return text


class Evaluator:
    """Validation loss over a fixed set of samples, one compiled batch shape (the last batch is padded)."""

    def __init__(self, model, samples: np.ndarray, *, batch_size: int, max_batches: int | None) -> None:
        from .step import EvalStep

        self.model = model
        n = len(samples) if max_batches is None else min(len(samples), max_batches * batch_size)
        self.samples = samples[:n]
        self.batch_size = min(batch_size, n)
        self.cell = EvalStep(model)

    def __call__(self) -> tuple[float, int]:
        """(mean loss in nats per predicted token, predicted tokens)."""
        import mindspore as ms

        self.cell.set_train(False)
        total, rows = 0.0, len(self.samples)
        for start in range(0, rows, self.batch_size):
            batch = self.samples[start : start + self.batch_size]
            real = len(batch)
            if real < self.batch_size:  # pad to the compiled shape; the padding rows are not counted
                batch = np.concatenate([batch, np.repeat(batch[:1], self.batch_size - real, axis=0)])
            nll = self.cell(ms.Tensor(batch, ms.int32)).asnumpy()
            total += float(nll[:real].astype(np.float64).sum())
        tokens = rows * (self.samples.shape[1] - 1)
        return total / tokens, tokens


def unigram_perplexity(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Perplexity on `val`'s predicted tokens of an add-one-smoothed unigram model counted on `train`."""
    counts = np.bincount(train.ravel(), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(np.exp(-logp[val[:, 1:].ravel()].mean()))


def evaluate(cfg: RunConfig, *, split: str = "validation", model=None) -> EvalReport:
    """Perplexity of the model (cfg.model.pretrained, or `model`) on one split of cfg.data.dataset_dir."""
    from model.runtime import set_device

    if not cfg.data.dataset_dir:
        raise ConfigError("eval needs data: pass --dataset_dir DIR")
    set_device(cfg.device_target)
    check_parallel(cfg)
    if model is None:
        model = build_model(cfg)
    samples = load_samples(cfg.data.dataset_dir, split, seq_length=cfg.data.seq_length)
    evaluator = Evaluator(model, samples, batch_size=cfg.eval.batch_size, max_batches=cfg.eval.max_batches)
    loss, tokens = evaluator()
    unigram = None
    train = optional_split(cfg.data.dataset_dir, "train", cfg.data.seq_length) if split != "train" else None
    if train is not None:
        unigram = unigram_perplexity(train, evaluator.samples, model.config.vocab_size)
    return EvalReport(
        loss=loss, perplexity=math.exp(loss), tokens=tokens, samples=len(evaluator.samples), unigram_perplexity=unigram
    )


def optional_split(dataset: str, split: str, seq: int) -> np.ndarray | None:
    try:
        split_path(dataset, split)
    except DatasetError:
        return None
    return load_samples(dataset, split, seq_length=seq)
