"""`tools/train.py --run_mode eval` and the server's scoring agree on the same tokens and weights.

The validation samples of a prepared dataset are scored two ways: by the training tool's evaluation (the
compiled training-side forward) and by a real server's `/v1/completions` with `echo` + `logprobs` and
`max_tokens=0` (the KV-cache prefill graphs). Both perplexities must be the same number.
"""

from __future__ import annotations

import math
from pathlib import Path

import httpx
import pytest

from serving_helpers import ServerProcess, make_tiny_model
from tools.prepare_data import prepare
from tools.training.config import load_config
from tools.training.data import load_samples

SONNETS = Path(__file__).parent / "data" / "sonnets.txt"


@pytest.mark.slow
def test_eval_perplexity_agrees_with_the_scoring_endpoint(tmp_path):
    from tools.training.trainer import evaluate

    model_dir = make_tiny_model(tmp_path / "model")
    dataset = tmp_path / "sonnets-32"
    prepare(inputs=[SONNETS], output_dir=dataset, seq_length=32, val_fraction=0.1, progress=False)
    cfg = load_config(None, {
        "run_mode": "eval", "device_target": "CPU", "output_dir": str(tmp_path / "eval"),
        "model.pretrained": str(model_dir), "data.dataset_dir": str(dataset), "data.seq_length": 32,
        "eval.max_batches": None, "eval.batch_size": 4, "logging.progress_bar": False,
    })
    report = evaluate(cfg)

    samples = load_samples(dataset, "validation")
    server = ServerProcess(model_dir, "--max-batch-size", "4", log_path=tmp_path / "server.log")
    try:
        server.wait_healthy()
        r = httpx.post(server.url + "/v1/completions", timeout=300, json={
            "model": server_model_name(server), "prompt": [[int(t) for t in row] for row in samples],
            "echo": True, "logprobs": 1, "max_tokens": 0,
        })
        assert r.status_code == 200, r.text
        choices = r.json()["choices"]
    finally:
        server.stop()

    assert len(choices) == len(samples)
    nll, count = 0.0, 0
    for row, choice in zip(samples, choices):
        logprobs = choice["logprobs"]["token_logprobs"]
        assert len(logprobs) == len(row) and logprobs[0] is None  # the first token has no context
        nll -= sum(logprobs[1:])
        count += len(row) - 1
    assert report.tokens == count
    assert math.exp(nll / count) == pytest.approx(report.perplexity, rel=1e-4)


def server_model_name(server: ServerProcess) -> str:
    return httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"]
