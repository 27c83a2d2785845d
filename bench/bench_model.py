"""Model-level throughput of the MindSpore GPT-2 next to Hugging Face transformers (PyTorch): decode latency,
prefill and scoring tokens/s, and the memory-bandwidth floor of batch-1 decode.

    python bench/bench_model.py                # 124M: decode b=1,8,32 at context 128 and 512, prefill, scoring
    python bench/bench_model.py --layers 2 --batches 1,4 --contexts 128 --prefill 1x128 --score 1x128 --steps 4
    python bench/bench_model.py --preset gpt2-xl --batches 1,4 --prefill 1x128 --score '' --max-seq-len 512

Both frameworks run the same random weights (124M-shaped unless --preset) in one process with the same number
of CPU threads, alternating per measurement so that other load on the machine hits both alike; fp32.

- decode: ours is `InferenceSession.step` (compiled graph, preallocated KV cache, one token per row), theirs
  `model(tok, cache=DynamicCache)` under `torch.inference_mode()`. "Context C" means the timed steps run at
  positions C-steps .. C-1, i.e. attend to at most C tokens (ours gathers its context bucket, which is C itself
  for 128 and 512; just past a bucket boundary it would gather the next bucket). The cache holds random K/V
  rather than a prefilled prompt: the cost of a step does not depend on the values. Median of --steps steps
  after one untimed step (ours compiles there).
- prefill BxT: one forward of B prompts of T tokens into an empty cache, logits of the last position only
  (transformers: `logits_to_keep=1`, as `generate()` does). Best of --repeat after a warm-up run.
- scoring BxT: logits of every position turned into the log-prob of each next token. Ours:
  `step(..., logits_index=None)` then `model.sampler.log_softmax` and a gather, the server's /score path;
  theirs: `model(ids).logits`, `torch.log_softmax`, `gather`. Best of --repeat.
- bandwidth floor: batch-1 decode must read every weight once, so it cannot beat weight bytes / memory
  bandwidth. Bandwidth = best of 5 numpy copies of a --copy-mb MB array, counted as bytes read + written
  (STREAM's convention), measured in this run.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402


def copy_bandwidth(mb: int, repeat: int = 5) -> float:
    """Bytes/s of numpy copying an `mb` MB array (read + write counted), best of `repeat`."""
    src = np.ones(mb * 2**20 // 8, np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch the pages
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def main(argv: list[str] | None = None) -> int:
    ap = benchlib.arg_parser(__doc__)
    ap.add_argument("--preset", default="gpt2", help="model shape: gpt2 (124M), gpt2-medium, gpt2-large, gpt2-xl")
    ap.add_argument("--layers", type=int, default=None, help="layer count (default: the preset's)")
    ap.add_argument("--batches", default="1,8,32", help="decode batch sizes")
    ap.add_argument("--contexts", default="128,512", help="decode context lengths")
    ap.add_argument("--steps", type=int, default=16, help="timed decode steps per measurement")
    ap.add_argument("--prefill", default="1x128,1x512,8x128,8x512", help="prefill shapes BxT ('' for none)")
    ap.add_argument("--score", default="1x512,8x128", help="scoring shapes BxT ('' for none)")
    ap.add_argument("--repeat", type=int, default=3, help="prefill/scoring: best of this many after a warm-up")
    ap.add_argument("--max-seq-len", type=int, default=1024, help="our session's positions per slot (the server's)")
    ap.add_argument("--copy-mb", type=int, default=256, help="array size of the bandwidth measurement")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for both frameworks (default: all usable)")
    ap.add_argument("--quantize", choices=("int8",),
                    help="our session with int8 weights (the server's --quantize int8); transformers stays float32")
    ap.add_argument("--json", help="write the results here (rewritten after every measurement)")
    args = ap.parse_args(argv)

    import torch
    import transformers

    from model import GPT2Config, GPT2LMHeadModel, InferenceSession
    from model.checkpoint import load_state_dict, parameter_shapes
    from model.runtime import set_device

    import hf_compat

    threads = args.threads or len(os.sched_getaffinity(0))
    set_device("CPU", cpu_threads=threads)
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    batches = [int(b) for b in args.batches.split(",") if b]
    contexts = [int(c) for c in args.contexts.split(",") if c]
    prefills = _shapes(args.prefill)
    scores = _shapes(args.score)

    layers = {} if args.layers is None else {"n_layer": args.layers}
    cfg = GPT2Config.from_preset(args.preset, **layers, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    args.layers = cfg.n_layer
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg.to_dict())).eval()
    names = parameter_shapes(cfg)
    weights = {k: v.numpy() for k, v in hf.state_dict().items() if k in names}
    from model.gpt2 import is_transposed_weight
    from model.quantize import is_quantized_name

    # The bytes a decode step reads: int8 tensors at a byte per weight plus a float32 scale per output row (HF
    # layout: a Conv1D weight is [in, out]).
    weight_bytes = sum(a.size + 4 * a.shape[is_transposed_weight(k)] if args.quantize and is_quantized_name(k)
                       else a.nbytes for k, a in weights.items())
    import mindspore as ms

    from model import kernels
    from model.checkpoint import load_packed
    from model.gpt2 import weights_loaded_later

    with weights_loaded_later():
        ours = GPT2LMHeadModel(cfg)
    # As the server loads it: the weights the session packs go straight to their packed form (GPT-2 1.5B's float
    # copy and transformers' would not fit beside it in 24 GB).
    pack = "int8" if args.quantize else kernels.packed_form(cfg, ms.float32)
    if pack:
        load_packed(ours, weights, pack)
    else:
        load_state_dict(ours, weights)
    del weights
    slots = max(batches + [b for b, _ in prefills + scores])
    # As the server runs it: with the AMX copy of the weights where the CPU has AMX.
    sess = InferenceSession(ours, num_slots=slots, max_seq_len=args.max_seq_len, packed_weights=True,
                            quantize=args.quantize)
    rng = np.random.default_rng(0)
    res: dict = {"preset": args.preset, "n_embd": cfg.n_embd, "layers": args.layers, "threads": threads,
                 "weight_bytes": weight_bytes, "steps": args.steps,
                 "max_seq_len": args.max_seq_len, "slots": slots, "packed_weights": sess.packed_form,
                 "quantize": args.quantize, "decode": [], "prefill": [],
                 "score": []}
    print(f"GPT-2 {args.preset}: {args.layers} layers, n_embd {cfg.n_embd}, vocab {cfg.vocab_size}, fp32, "
          f"{threads} threads; "
          f"our session: {slots} slots x {args.max_seq_len} positions"
          f"{', weights packed as ' + sess.packed_form if sess.packed_weights else ''}; mindspore vs transformers "
          f"{transformers.__version__} (torch {torch.__version__})", flush=True)

    bw = copy_bandwidth(args.copy_mb)
    res["copy_bandwidth_bytes_s"] = bw
    res["decode_floor_ms"] = 1000 * weight_bytes / bw
    print(f"\nmemory copy bandwidth {bw / 1e9:.1f} GB/s (numpy, {args.copy_mb} MB, read + write); weights "
          f"{weight_bytes / 1e6:.0f} MB -> batch-1 decode floor {res['decode_floor_ms']:.1f} ms/token", flush=True)
    benchlib.write_json(args.json, res)

    print(f"\ndecode, median of {args.steps} steps (ms/step; tokens/s = batch / step)")
    print(f"{'ctx':>4} {'batch':>5} | {'ours':>20} | {'transformers':>20} | ours/theirs time")
    for ctx in contexts:
        for b in batches:
            ms_t = _ms_decode(sess, b, ctx, args.steps, rng, cfg.vocab_size)
            pt_t = _pt_decode(hf, torch, hf_compat, b, ctx, args.steps, rng, cfg.vocab_size)
            res["decode"].append({"batch": b, "context": ctx, "ours_ms": 1000 * ms_t, "ref_ms": 1000 * pt_t})
            benchlib.write_json(args.json, res)
            print(f"{ctx:>4} {b:>5} | {ms_t * 1e3:7.1f} ms {b / ms_t:7.0f} t/s | {pt_t * 1e3:7.1f} ms "
                  f"{b / pt_t:7.0f} t/s | {ms_t / pt_t:5.2f}", flush=True)

    if prefills:
        print(f"\nprefill, logits of the last position (tokens/s, best of {args.repeat} after a warm-up)")
        print(f"{'shape':>7} | {'ours':>10} | {'transformers':>12} | ours/theirs")
    for b, t in prefills:
        ids = rng.integers(0, cfg.vocab_size, (b, t))
        pos = np.broadcast_to(np.arange(t), (b, t))
        ms_s = _best(lambda: sess.step(ids, pos, np.arange(b), np.full(b, t - 1)), args.repeat)
        tid = torch.as_tensor(ids)
        pt_s = _best(lambda: _pt_run(torch, lambda: hf_compat.forward(hf, tid, None, logits_to_keep=1)), args.repeat)
        res["prefill"].append({"batch": b, "tokens": t, "ours_tok_s": b * t / ms_s, "ref_tok_s": b * t / pt_s})
        benchlib.write_json(args.json, res)
        print(f"{b}x{t:<5} | {b * t / ms_s:10.0f} | {b * t / pt_s:12.0f} | {pt_s / ms_s:5.2f}", flush=True)

    if scores:
        from model.sampler import log_softmax

        print(f"\nscoring: log-prob of every next token (tokens/s, best of {args.repeat} after a warm-up)")
        print(f"{'shape':>7} | {'ours':>10} | {'transformers':>12} | ours/theirs")
    for b, t in scores:
        ids = rng.integers(0, cfg.vocab_size, (b, t))
        pos = np.broadcast_to(np.arange(t), (b, t))

        def ours_score():
            logits = sess.step(ids, pos, np.arange(b), None)[:, :-1]  # (B, T-1, V)
            return np.take_along_axis(log_softmax(logits), ids[:, 1:, None], -1)[..., 0]

        tid = torch.as_tensor(ids)

        def theirs_score():
            with torch.inference_mode():
                logits = hf(tid).logits[:, :-1]
                return torch.log_softmax(logits, -1).gather(-1, tid[:, 1:, None])[..., 0]

        a, bb = ours_score(), theirs_score().numpy()
        max_diff = float(np.abs(a - bb).max())
        ms_s, pt_s = _best(ours_score, args.repeat), _best(theirs_score, args.repeat)
        n = b * (t - 1)
        res["score"].append({"batch": b, "tokens": t, "ours_tok_s": n / ms_s, "ref_tok_s": n / pt_s,
                             "max_abs_diff": max_diff})
        benchlib.write_json(args.json, res)
        print(f"{b}x{t:<5} | {n / ms_s:10.0f} | {n / pt_s:12.0f} | {pt_s / ms_s:5.2f}   "
              f"(max |logprob difference| {max_diff:.1e})", flush=True)
    return 0


def _shapes(spec: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in s.split("x")) for s in spec.split(",") if s]


def _best(fn, n: int) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _pt_run(torch, fn):
    with torch.inference_mode():
        return fn()


def _ms_decode(sess, b: int, ctx: int, steps: int, rng, vocab: int) -> float:
    """Median seconds of a batch-b decode step at positions ctx-steps .. ctx-1 (one untimed step before)."""
    slots = np.arange(b)
    start = ctx - steps - 1
    if start < 0:
        raise ValueError(f"context {ctx} is shorter than {steps} steps + 1")
    times = []
    for i in range(steps + 1):
        tok = rng.integers(0, vocab, (b, 1))
        t0 = time.perf_counter()
        sess.step(tok, np.full((b, 1), start + i), slots, np.zeros(b, np.int32))
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def _pt_decode(hf, torch, hf_compat, b: int, ctx: int, steps: int, rng, vocab: int) -> float:
    """The same for transformers: a cache holding ctx-steps-1 positions, then steps + 1 one-token forwards."""
    cache = hf_compat.filled_cache(hf.config, b, ctx - steps - 1, torch)
    times = []
    with torch.inference_mode():
        for _ in range(steps + 1):
            tok = torch.as_tensor(rng.integers(0, vocab, (b, 1)))
            t0 = time.perf_counter()
            _, cache = hf_compat.forward(hf, tok, cache)
            times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


if __name__ == "__main__":
    sys.exit(main())
