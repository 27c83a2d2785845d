"""tools/eval_heldout.py's strongest unigram baseline: the maximum-likelihood model of the evaluated tokens."""

import math

import numpy as np

from tools.eval_heldout import mle_unigram_perplexity
from tools.training.evaluate import unigram_perplexity


def test_the_ml_unigram_is_the_entropy_of_the_counted_tokens_and_beats_add_one():
    # Predicted tokens (each row's first is context only): 1 twice, 2 once, 3 once.
    rows = np.array([[9, 1, 1], [9, 2, 3]])
    expected = math.exp(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    assert math.isclose(mle_unigram_perplexity(rows), expected)
    # No unigram model does better on these tokens, an add-one model fitted on them included.
    assert mle_unigram_perplexity(rows) < unigram_perplexity(rows, rows, vocab_size=10)
