"""Training throughput: this project's compiled MindSpore step against the same GPT-2 trained in PyTorch.

    python bench/bench_train.py                       # GPT-2 124M shape and the default model's shape
    python bench/bench_train.py --shapes small --steps 5
    python bench/bench_train.py --shapes gpt2-355m --steps 2   # GPT-2 355M, gradient accumulation, peak RSS
    python bench/bench_train.py --json out.json       # also write the numbers as JSON

Both sides run the same model (Hugging Face GPT-2 architecture and init ranges), the same batch of random
token ids, a full step (forward, backward, gradient clipping at 1.0, AdamW) in float32 on the device this
machine has (CPU here). Each measurement runs in its own process so the two frameworks' thread pools do not
compete; the first `--warmup` steps (MindSpore compiles its graph there) are not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402

SHAPES = {
    # name: (GPT-2 config fields, batch, sequence length[, micro-steps accumulated per optimizer step])
    "gpt2-124m": ({"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024}, 1, 128),
    "small": ({"n_layer": 4, "n_head": 4, "n_embd": 128, "n_positions": 256}, 4, 256),
    # GPT-2 355M with gradient accumulation: 4 micro-batches of 1 x 512 tokens per AdamW step
    "gpt2-355m": ({"n_layer": 24, "n_head": 16, "n_embd": 1024, "n_positions": 1024}, 1, 512, 4),
}


def _shape(name: str) -> tuple[dict, int, int, int]:
    fields, batch, seq, *accum = SHAPES[name]
    return fields, batch, seq, (accum or [1])[0]


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes
NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def _batch(batch: int, seq: int):
    import numpy as np

    return np.random.default_rng(0).integers(0, 50257, size=(batch, seq + 1), dtype=np.int32)


def run_mindspore(shape: str, steps: int, warmup: int) -> dict:
    import mindspore as ms

    from model import GPT2Config, GPT2LMHeadModel
    from model.runtime import set_device
    from tools.training.step import AdamW, TrainStep

    fields, batch, seq, accum = _shape(shape)
    set_device("CPU")
    ms.set_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**fields, **NO_DROPOUT))
    model.set_train(True)
    opt = AdamW(model.trainable_params(), weight_decay=0.1, beta1=0.9, beta2=0.95)
    step = TrainStep(model, opt, grad_clip=1.0, accum_steps=accum)
    x = ms.Tensor(_batch(batch, seq))

    def one_step():
        for _ in range(accum - 1):
            step.micro(x)
        loss, _, _ = step.last(x, 1e-4)
        return float(loss.asnumpy())

    t0 = time.perf_counter()
    for _ in range(warmup):
        one_step()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = one_step()
    dt = time.perf_counter() - t0
    params = sum(int(p.size) for p in model.trainable_params())
    return {"tokens_per_s": batch * seq * accum * steps / dt, "warmup_s": first, "loss": loss, "params": params,
            "peak_rss_bytes": _peak_rss_bytes()}


def run_torch(shape: str, steps: int, warmup: int) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    fields, batch, seq, accum = _shape(shape)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**fields, **NO_DROPOUT))
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "wpe" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "wpe" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95))
    x = torch.from_numpy(_batch(batch, seq)).long()

    def one_step() -> float:
        for _ in range(accum):
            logits = model(x[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    t0 = time.perf_counter()
    for _ in range(warmup):
        one_step()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = one_step()
    dt = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    return {"tokens_per_s": batch * seq * accum * steps / dt, "warmup_s": first, "loss": loss, "params": params,
            "threads": torch.get_num_threads(), "peak_rss_bytes": _peak_rss_bytes()}


def _measure(framework: str, shape: str, steps: int, warmup: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", framework, "--shapes", shape,
           "--steps", str(steps), "--warmup", str(warmup)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{framework} {shape} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {', '.join(SHAPES)}")
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed first steps (MindSpore compiles here)")
    p.add_argument("--json", help="write the results here (rewritten after every shape)")
    p.add_argument("--worker", choices=("mindspore", "torch"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    shapes = args.shapes.split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        p.error(f"unknown shapes {unknown}; choose from {', '.join(SHAPES)}")
    if args.worker:
        fn = run_mindspore if args.worker == "mindspore" else run_torch
        print(json.dumps(fn(shapes[0], args.steps, args.warmup)), flush=True)
        return 0

    import mindspore
    import torch

    print(f"training throughput, float32, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"mindspore {mindspore.__version__}, torch {torch.__version__}; {args.steps} timed steps after "
          f"{args.warmup} warm-up")
    header = f"{'shape':<10} {'params':>8} {'batch x seq':>11} {'MindSpore tok/s':>15} {'PyTorch tok/s':>13} " \
             f"{'MS/PT':>6} {'MS warm-up s':>12} {'PT warm-up s':>12}"
    print(header)
    print("-" * len(header))
    results: dict = {"steps": args.steps, "warmup": args.warmup, "shapes": [], "errors": []}
    for shape in shapes:
        fields, batch, seq, accum = _shape(shape)
        try:
            ms_r = _measure("mindspore", shape, args.steps, args.warmup)
            pt_r = _measure("torch", shape, args.steps, args.warmup)
        except RuntimeError as e:  # one shape failing is reported; the next still runs
            results["errors"].append(f"{shape}: {e}")
            print(f"{shape:<10} failed: {e}", flush=True)
            benchlib.write_json(args.json, results)
            continue
        results["shapes"].append({"shape": shape, "batch": batch, "seq": seq, "accum": accum,
                                  "n_layer": fields["n_layer"],
                                  "n_embd": fields["n_embd"], "mindspore": ms_r, "torch": pt_r})
        benchlib.write_json(args.json, results)
        print(f"{shape:<10} {ms_r['params'] / 1e6:>7.1f}M {f'{batch} x {seq}':>11} {ms_r['tokens_per_s']:>15.0f} "
              f"{pt_r['tokens_per_s']:>13.0f} {ms_r['tokens_per_s'] / pt_r['tokens_per_s']:>6.2f} "
              f"{ms_r['warmup_s']:>12.1f} {pt_r['warmup_s']:>12.1f}   x{accum} accumulated; peak RSS "
              f"{ms_r['peak_rss_bytes'] / 1e9:.2f} / {pt_r['peak_rss_bytes'] / 1e9:.2f} GB", flush=True)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
