"""The serving benchmark's reference: a transformers (PyTorch) GPT-2 behind the same TGI `/generate_stream` SSE
wire format as this project's server. Lives in bench/ only; the project's server never imports torch.

    python bench/hf_baseline_server.py --model DIR --port 8001 --mode single
    python bench/hf_baseline_server.py --model DIR --port 8001 --mode static --max-batch-size 32

One worker thread runs the model; requests reach it through a queue and tokens come back to each request's
asyncio queue. Greedy decoding with a KV cache, stopping at EOS or `max_new_tokens` (the random-weight model
practically never emits EOS).

- `--mode single`: one request at a time, a `generate()`-like loop (prefill, then one token per forward).
- `--mode static`: static batching. The worker takes the first waiting request, waits up to `--batch-window-ms`
  for more (up to `--max-batch-size`), runs them as one left-padded batch (attention mask, position ids from
  the mask) until the longest is done, and only then starts the next batch.

A client that disconnects is dropped from its batch (a batch whose clients all left stops). `GET /health` is
200 once the model is loaded (before the port is opened). Events match TGI's and this project's:
`data:{"index":..,"token":{"id":..,"text":..,"logprob":..,"special":false},"generated_text":null,"details":null}`,
the last one carrying `generated_text`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Job:
    ids: list[int]
    max_new_tokens: int
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    cancelled: bool = False
    text: list[str] = field(default_factory=list)

    def emit(self, event: dict[str, Any] | None) -> None:
        """Hand an event (None = end of stream) to the request's coroutine, from the worker thread."""
        self.loop.call_soon_threadsafe(self.out.put_nowait, event)


class Worker:
    """The one thread that runs the model, in `single` or `static` mode."""

    def __init__(self, model: Any, tokenizer: Any, *, mode: str, max_batch: int, window_s: float) -> None:
        import torch

        self.torch = torch
        self.model = model
        self.tok = tokenizer
        self.mode = mode
        self.max_batch = max_batch
        self.window_s = window_s
        self.eos = model.config.eos_token_id
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="hf-worker", daemon=True)

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def _run(self) -> None:
        with self.torch.inference_mode():
            while True:
                batch = [self.jobs.get()]
                if self.mode == "static":
                    deadline = time.perf_counter() + self.window_s
                    while len(batch) < self.max_batch:
                        left = deadline - time.perf_counter()
                        try:
                            batch.append(self.jobs.get(timeout=left) if left > 0 else self.jobs.get_nowait())
                        except queue.Empty:
                            break
                batch = [j for j in batch if not j.cancelled]
                if not batch:
                    continue
                try:
                    self._generate(batch)
                except Exception as e:  # noqa: BLE001 - report to the clients, keep serving
                    for j in batch:
                        j.emit({"error": f"{type(e).__name__}: {e}", "error_type": "generation"})
                        j.emit(None)

    def _generate(self, batch: list[Job]) -> None:
        """Greedy decoding of a left-padded batch (a batch of one in single mode) until every row is done."""
        from hf_compat import forward

        torch = self.torch
        n, longest = len(batch), max(len(j.ids) for j in batch)
        ids = torch.full((n, longest), self.eos, dtype=torch.long)
        mask = torch.zeros((n, longest), dtype=torch.long)
        for i, j in enumerate(batch):
            ids[i, longest - len(j.ids):] = torch.tensor(j.ids)
            mask[i, longest - len(j.ids):] = 1
        kw: dict[str, Any] = {}
        if n > 1:
            kw = {"attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
        logits, cache = forward(self.model, ids, None, logits_to_keep=1, **kw)
        done = [False] * n
        counts = [0] * n
        positions = mask.sum(-1, keepdim=True)  # next position of each row
        for step in range(max(j.max_new_tokens for j in batch)):
            last = logits[:, -1, :]
            tokens = last.argmax(-1)
            logprobs = torch.log_softmax(last.float(), -1).gather(-1, tokens[:, None])[:, 0]
            for i, j in enumerate(batch):
                if done[i]:
                    continue
                if j.cancelled:
                    done[i] = True
                    continue
                t = int(tokens[i])
                counts[i] += 1
                final = t == self.eos or counts[i] >= j.max_new_tokens
                self._emit_token(j, counts[i], t, float(logprobs[i]), final)
                done[i] = final
            if all(done):
                return
            if n > 1:
                mask = torch.cat([mask, torch.ones((n, 1), dtype=torch.long)], dim=1)
                kw = {"attention_mask": mask, "position_ids": positions}
                positions = positions + 1
            logits, cache = forward(self.model, tokens[:, None], cache, **kw)

    def _emit_token(self, job: Job, index: int, token: int, logprob: float, final: bool) -> None:
        special = token == self.eos
        text = "" if special else self.tok.decode([token])
        job.text.append(text)
        job.emit({
            "index": index,
            "token": {"id": token, "text": text, "logprob": logprob, "special": special},
            "generated_text": "".join(job.text) if final else None,
            "details": None,
        })
        if final:
            job.emit(None)


def create_app(worker: Worker, n_positions: int) -> FastAPI:
    app = FastAPI(title="transformers GPT-2 baseline")

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok", "mode": worker.mode})

    @app.post("/generate_stream")
    async def generate_stream(request: Request) -> Response:
        body = await request.json()
        params = body.get("parameters") or {}
        ids = worker.tok.encode(body.get("inputs", ""))
        max_new = int(params.get("max_new_tokens") or 100)
        if not ids or max_new < 1 or len(ids) + max_new > n_positions:
            return JSONResponse({"error": f"prompt of {len(ids)} tokens + {max_new} new tokens must fit "
                                 f"{n_positions} positions", "error_type": "validation"}, status_code=422)
        job = Job(ids, max_new, asyncio.get_running_loop(), asyncio.Queue())
        worker.submit(job)

        async def events():
            try:
                while (event := await job.out.get()) is not None:
                    yield f"data:{json.dumps(event, separators=(',', ':'))}\n\n".encode()
            finally:
                job.cancelled = True  # finished, or the client went away: the worker drops the row

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model directory (config.json + model.safetensors, HF layout)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--mode", choices=("single", "static"), default="single")
    p.add_argument("--max-batch-size", type=int, default=32, help="static mode: most requests per batch")
    p.add_argument("--batch-window-ms", type=float, default=100.0,
                   help="static mode: how long to wait for more requests after the first")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the CPUs this process may use)")
    args = p.parse_args(argv)

    import torch
    import transformers
    import uvicorn

    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    transformers.logging.set_verbosity_error()
    model = transformers.GPT2LMHeadModel.from_pretrained(args.model, local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    worker = Worker(model, tokenizer, mode=args.mode, max_batch=args.max_batch_size,
                    window_s=args.batch_window_ms / 1000)
    worker.thread.start()
    app = create_app(worker, model.config.n_positions)
    print(f"transformers {transformers.__version__} baseline ({args.mode}) on http://{args.host}:{args.port}",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
