"""Create a random-weights GPT-2 model directory (config.json, weights, GPT-2 tokenizer files).

For tests and benchmarks:

    python -m tools.init_model models/default                       # 124M-shaped ("gpt2" preset)
    python -m tools.init_model /tmp/tiny --n-layer 2 --n-embd 64 --n-head 4 --n-positions 128

Weights are deterministic for a given seed. The model says nothing useful: it only has the right shapes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def init_model(*, dst: str | Path, preset: str = "gpt2", seed: int = 0, **overrides: Any) -> Path:
    """Write a randomly initialised model of `preset` (fields replaced by `overrides`) to `dst`."""
    import mindspore as ms
    import numpy as np

    from model import GPT2Config, GPT2LMHeadModel
    from model.checkpoint import save_model_dir
    from model.runtime import set_device

    set_device("CPU")
    ms.set_seed(seed)
    np.random.seed(seed)
    cfg = GPT2Config.from_preset(preset, **overrides)
    save_model_dir(GPT2LMHeadModel(cfg), dst)
    return Path(dst)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dst", help="model directory to create (an existing model directory or empty one is replaced; "
                               "a folder of other files is refused)")
    p.add_argument("--preset", default="gpt2", help="gpt2 | gpt2-medium | gpt2-large | gpt2-xl | gpt2-13b")
    p.add_argument("--n-layer", type=int)
    p.add_argument("--n-embd", type=int)
    p.add_argument("--n-head", type=int)
    p.add_argument("--n-positions", type=int)
    p.add_argument("--init-std", type=float, dest="initializer_range",
                   help="weight init std (default 0.02; larger spreads the logits of a tiny model)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("dst", "preset", "seed") and v is not None}
    try:
        path = init_model(dst=args.dst, preset=args.preset, seed=args.seed, **overrides)
    except (ValueError, FileExistsError) as e:
        print(f"init_model: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
