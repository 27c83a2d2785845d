"""Decode latency and prefill throughput of the MindSpore GPT-2 next to Hugging Face transformers (PyTorch).

Both run the same random GPT-2 124M-shaped weights in one process, alternating per measurement so that other
load on the machine hits both alike. MindSpore runs through `InferenceSession.step` (compiled graphs, KV cache);
transformers through `model(..., past_key_values=...)` under `torch.inference_mode()`.

    python bench/bench_model.py                 # 124M, decode at batch 1, 8, 32; prefill 1x512 and 8x128
    python bench/bench_model.py --layers 2 --batches 1,8 --steps 4   # quick look
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--batches", default="1,8,32", help="decode batch sizes")
    ap.add_argument("--prompt", type=int, default=128, help="prompt length before decoding")
    ap.add_argument("--steps", type=int, default=16, help="timed decode steps per batch size")
    ap.add_argument("--prefill", default="1x512,8x128", help="prefill shapes BxT")
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for both frameworks")
    args = ap.parse_args()

    import torch
    import transformers

    from model import GPT2Config, GPT2LMHeadModel, InferenceSession
    from model.checkpoint import load_state_dict
    from model.runtime import set_device

    threads = args.threads or len(os.sched_getaffinity(0))
    set_device("CPU", cpu_threads=threads)
    torch.set_num_threads(threads)
    batches = [int(b) for b in args.batches.split(",")]
    prefills = [tuple(int(x) for x in s.split("x")) for s in args.prefill.split(",") if s]

    cfg = GPT2Config.from_preset("gpt2", n_layer=args.layers, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg.to_dict())).eval()
    ours = GPT2LMHeadModel(cfg)
    load_state_dict(ours, {k: v.numpy() for k, v in hf.state_dict().items() if k in _names(cfg)})
    slots = max(batches + [b for b, _ in prefills])
    sess = InferenceSession(ours, num_slots=slots, max_seq_len=args.max_seq_len)
    rng = np.random.default_rng(0)
    print(f"GPT-2 {args.layers} layers, n_embd {cfg.n_embd}, vocab {cfg.vocab_size}, fp32, {threads} CPU threads; "
          f"MindSpore session: {slots} slots x {args.max_seq_len} positions")

    print(f"\ndecode after a {args.prompt}-token prompt, median of {args.steps} steps (ms/step; tokens/s)")
    print(f"{'batch':>5} | {'mindspore':>22} | {'transformers':>22} | speed-up")
    for b in batches:
        prompt = rng.integers(0, cfg.vocab_size, (b, args.prompt))
        ms_t = _ms_decode(sess, prompt, args.steps, rng, cfg.vocab_size)
        pt_t = _pt_decode(hf, torch, prompt, args.steps, rng, cfg.vocab_size)
        print(f"{b:>5} | {ms_t * 1e3:8.1f} ms {b / ms_t:8.0f} t/s | {pt_t * 1e3:8.1f} ms {b / pt_t:8.0f} t/s "
              f"| {pt_t / ms_t:5.2f}x", flush=True)

    print("\nprefill (tokens/s, best of 3 after a warm-up run)")
    print(f"{'shape':>7} | {'mindspore':>12} | {'transformers':>12}")
    for b, t in prefills:
        ids = rng.integers(0, cfg.vocab_size, (b, t))
        pos = np.broadcast_to(np.arange(t), (b, t))
        run_ms = lambda: sess.step(ids, pos, np.arange(b), np.full(b, t - 1))  # noqa: E731
        run_pt = lambda: _pt_prefill(hf, torch, ids)  # noqa: E731
        ms_s, pt_s = _best(run_ms), _best(run_pt)
        print(f"{b}x{t:<5} | {b * t / ms_s:12.0f} | {b * t / pt_s:12.0f}", flush=True)


def _names(cfg):
    from model.checkpoint import parameter_shapes

    return parameter_shapes(cfg)


def _best(fn, n: int = 3) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _ms_decode(sess, prompt, steps, rng, vocab) -> float:
    b, p = prompt.shape
    slots = np.arange(b)
    sess.step(prompt, np.broadcast_to(np.arange(p), (b, p)), slots, np.full(b, p - 1))
    times = []
    for i in range(steps + 1):  # the first step compiles the decode graph
        tok = rng.integers(0, vocab, (b, 1))
        t0 = time.perf_counter()
        sess.step(tok, np.full((b, 1), p + i), slots, np.zeros(b, np.int32))
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def _pt_prefill(hf, torch, ids):
    with torch.inference_mode():
        return hf(torch.as_tensor(ids), use_cache=True)


def _pt_decode(hf, torch, prompt, steps, rng, vocab) -> float:
    b = prompt.shape[0]
    with torch.inference_mode():
        past = _pt_prefill(hf, torch, prompt).past_key_values
        times = []
        for _ in range(steps + 1):
            tok = torch.as_tensor(rng.integers(0, vocab, (b, 1)))
            t0 = time.perf_counter()
            out = hf(tok, past_key_values=past, use_cache=True)
            times.append(time.perf_counter() - t0)
            past = out.past_key_values
    return float(np.median(times[1:]))


if __name__ == "__main__":
    main()
