"""EleutherAI's lm-evaluation-harness (`lm_eval`, model `local-completions`) against a real server, unchanged.

A tiny random model is served as a user would serve one for lm_eval, and lm_eval's Python API evaluates the local
tasks of tests/data/lm_eval/ (multiple choice, cloze, generation with stop strings, document perplexity; no
download) through /v1/completions, twice: with token-id prompts, batched and concurrent (lm_eval's default
`tokenized_requests=True`), and with text prompts one at a time (`tokenized_requests=False`, the form lm_eval's
README shows). Every per-sample number is then recomputed from the same requests with transformers'
GPT2LMHeadModel on the same weights: log-likelihoods within 1e-3, is_greedy and generated text exactly.

The server runs with `--max-stop-sequences 8`: lm_eval adds `<|endoftext|>` to a task's `until` strings, one more
than the default limit of 4 allows for a task with four (docs/EVALUATION.md).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from serving_helpers import REPO, ServerProcess, make_tiny_model

TASKS = REPO / "tests" / "data" / "lm_eval"
MAX_LENGTH = 256  # the tiny model's context window, told to lm_eval as max_length
LL_TOL = 1e-3


@pytest.mark.slow
def test_lm_eval_local_completions_matches_transformers(tmp_path, monkeypatch, request):
    # Nothing comes from a hub: the tokenizer is the model directory's, the data sets are local JSONL files.
    for name, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
                        ("HF_DATASETS_CACHE", str(tmp_path / "datasets"))):
        monkeypatch.setenv(name, value)
    # The task files name their data relative to the repository root, where docs/EVALUATION.md runs lm_eval.
    monkeypatch.chdir(REPO)
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    # The reference model is 64 wide: one torch thread is ~10x faster than two beside a busy server.
    request.addfinalizer(functools.partial(torch.set_num_threads, torch.get_num_threads()))
    torch.set_num_threads(1)
    model_dir = make_tiny_model(tmp_path / "model")
    server = ServerProcess(model_dir, "--served-model-name", "tiny-gpt2", "--max-batch-size", "4",
                           "--max-stop-sequences", "8", log_path=tmp_path / "server.log")
    runs = {}
    try:
        # While the server compiles its step graphs.
        ref = Reference(model_dir)
        tasks = ["local_mc", "local_cloze", "local_gen", "local_rolling", greedy_task(ref, tmp_path / "greedy.jsonl")]
        task_manager = TaskManager(include_path=str(TASKS), include_defaults=False)
        server.wait_healthy()
        for mode, args in (("token ids, batched", {"tokenized_requests": True, "batch_size": 8, "num_concurrent": 2}),
                           ("text, one by one", {"tokenized_requests": False, "batch_size": 1, "num_concurrent": 1})):
            runs[mode] = lm_eval.simple_evaluate(
                model="local-completions",
                model_args={"model": "tiny-gpt2", "base_url": server.url + "/v1/completions",
                            "tokenizer_backend": "huggingface", "tokenizer": str(model_dir),
                            "max_length": MAX_LENGTH, "max_retries": 1, **args},
                tasks=tasks, task_manager=task_manager, log_samples=True, bootstrap_iters=0,
            )
    finally:
        server.stop()

    worst, greedy_seen, stopped = 0.0, 0, 0
    for mode, run in runs.items():
        samples = run["samples"]
        for task in ("local_mc", "local_cloze", "local_greedy"):
            for s in samples[task]:
                lls = []
                for (context, continuation), resp in zip(s["arguments"], s["resps"]):
                    (ll, is_greedy), = resp
                    want, want_greedy = ref.loglikelihood(context, continuation)
                    worst = max(worst, abs(ll - want))
                    assert ll == pytest.approx(want, abs=LL_TOL), (mode, task, context, continuation)
                    assert is_greedy == want_greedy, (mode, task, context, continuation, ll, want)
                    greedy_seen += is_greedy
                    lls.append(want)
                if task == "local_mc":
                    assert s["acc"] == float(max(range(len(lls)), key=lls.__getitem__) == int(s["target"]))
        for s in samples["local_rolling"]:
            (text,), [[ll]] = s["arguments"][0], s["resps"]
            want = ref.loglikelihood_rolling(text)
            worst = max(worst, abs(ll - want))
            assert ll == pytest.approx(want, abs=LL_TOL), (mode, text[:40])
        for s in samples["local_gen"]:
            (context, gen_kwargs), [[text]] = s["arguments"][0], s["resps"]
            want, was_stopped = ref.generate_until(context, gen_kwargs["until"], gen_kwargs["max_gen_toks"])
            assert text == want, (mode, context)
            stopped += was_stopped
    print(f"max |loglikelihood - transformers| = {worst:.2e}; in both runs {greedy_seen} greedy continuations, "
          f"{stopped} generations cut at a stop string")
    # The comparisons above meant something: some continuations were greedy, some generations hit a stop string.
    assert greedy_seen and stopped
    for name in ("local_mc", "local_cloze", "local_rolling", "local_gen"):
        a, b = (run["results"][name] for run in runs.values())
        for metric, value in a.items():
            if isinstance(value, float):
                assert b[metric] == pytest.approx(value, rel=1e-4), (name, metric)


def greedy_task(ref: "Reference", path: Path) -> dict:
    """A loglikelihood task whose continuations are the model's own greedy tokens after the generation prompts, so
    that is_greedy is true for some requests (a random model's greedy choice is not known in advance)."""
    with path.open("w") as f:
        for line in (TASKS / "gen.jsonl").read_text().splitlines():
            context = json.loads(line)["prompt"]
            continuation = ref.greedy_text(context, 2)
            if "\ufffd" not in continuation:
                f.write(json.dumps({"context": context, "continuation": continuation}) + "\n")
    return {
        "task": "local_greedy", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path)}},
        "output_type": "loglikelihood", "test_split": "test", "doc_to_text": "{{context}}",
        "doc_to_target": "{{continuation}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }


class Reference:
    """The same requests as lm_eval makes them, evaluated with transformers (fp32, CPU); each request once, as both
    runs make the same ones."""

    def __init__(self, model_dir: Path) -> None:
        import torch
        import transformers

        self.torch = torch
        self.tok = transformers.AutoTokenizer.from_pretrained(model_dir)
        self.model = transformers.GPT2LMHeadModel.from_pretrained(model_dir).eval()
        self.eos = self.tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """Sum of the continuation's token logprobs given the context, and whether each token is the argmax."""
        with self.torch.no_grad():
            logits = self.model(self.torch.tensor([context + continuation])).logits[0, len(context) - 1 : -1]
        lp = self.torch.log_softmax(logits.double(), dim=-1)  # (len(continuation), vocab)
        cont = self.torch.tensor(continuation)
        total = lp[self.torch.arange(len(continuation)), cont].sum().item()
        return total, bool((lp.argmax(-1) == cont).all())

    @functools.cache
    def loglikelihood(self, context: str, continuation: str) -> tuple[float, bool]:
        # lm_eval's split: trailing spaces of the context go to the continuation, whose tokens are those of the
        # whole text after the context's (an empty context is the <|endoftext|> token).
        if not context:
            return self.score([self.eos], self.encode(continuation))
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        ctx = self.encode(context)
        return self.score(ctx, self.encode(context + continuation)[len(ctx):])

    @functools.cache
    def loglikelihood_rolling(self, text: str) -> float:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        # lm_eval's windows for API models: max_length - 1 positions per request (one is kept for the token the
        # request asks for), of which one at least is context.
        windows = get_rolling_token_windows(token_list=self.encode(text), prefix_token=self.eos,
                                            max_seq_len=MAX_LENGTH - 2, context_len=1)
        return sum(self.score(*make_disjoint_window(w))[0] for w in windows)

    def _greedy_ids(self, ids: list[int], n: int) -> list[int]:
        with self.torch.no_grad():
            out = self.model.generate(self.torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                      eos_token_id=self.eos, pad_token_id=self.eos)
        new = out[0, len(ids):].tolist()
        return new[: new.index(self.eos)] if self.eos in new else new

    @functools.cache
    def greedy_text(self, context: str, n: int) -> str:
        return self.tok.decode(self._greedy_ids(self.encode(context), n))

    def generate_until(self, context: str, until: list[str], max_gen_toks: int) -> tuple[str, bool]:
        """Greedy text cut before the first stop string (none of the task's is a substring of another, so the
        first to start is the first to complete), and whether one was found."""
        text = self.greedy_text(context, max_gen_toks)
        cut = min((i for i in (text.find(s) for s in until) if i >= 0), default=-1)
        return (text, False) if cut < 0 else (text[:cut], True)
