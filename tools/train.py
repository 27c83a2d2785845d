"""Train, finetune or evaluate GPT-2 on MindSpore, with MindFormers' command line.

    python tools/train.py --config configs/gpt2/run_gpt2.yaml --run_mode train \\
        --device_target CPU --dataset_dir data/wikitext2-1024
    python tools/train.py --config configs/gpt2/run_gpt2.yaml --run_mode finetune \\
        --load_checkpoint models/default --dataset_dir data/mytext --output_dir runs/ft
    python tools/train.py --config configs/gpt2/run_gpt2.yaml --run_mode eval \\
        --load_checkpoint runs/ft/model --dataset_dir data/mytext
    # several processes (data parallel): msrun --worker_num=2 --local_worker_num=2 tools/train.py ... \\
    #     --parallel.data_parallel 2

Any config value can be overridden as `--section.key VALUE` (`--train.max_steps 200`, `--model.config.n_layer 4`).
`--resume` continues from the newest checkpoint in OUTPUT_DIR/checkpoints (or `--resume DIR` from that one); a
damaged one (its state.ckpt no longer matches the recorded size and sha256) is refused, and `--resume auto`
goes back to the newest intact checkpoint instead, naming the ones it skipped.
The result of train/finetune is OUTPUT_DIR/model, a model directory the server serves as is.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from tools.training.checkpoint import CheckpointError
from tools.training.config import DEVICE_TARGETS, RUN_MODES, ConfigError, load_config, parse_overrides
from tools.training.data import DatasetError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train, finetune or evaluate GPT-2 on MindSpore.",
        epilog="Config overrides: --section.key VALUE, e.g. --train.lr 3e-4 --model.config.n_layer 4",
    )
    p.add_argument("--config", help="YAML run config (configs/gpt2/*.yaml); defaults apply without one")
    p.add_argument("--run_mode", choices=RUN_MODES, help="overrides run_mode in the config")
    p.add_argument("--device_target", choices=DEVICE_TARGETS)
    p.add_argument("--dataset_dir", help="directory made by tools/prepare_data.py, or one .mindrecord file")
    p.add_argument(
        "--load_checkpoint", "--model_dir", dest="load_checkpoint", help="model directory to finetune or evaluate"
    )
    p.add_argument("--output_dir", help="where checkpoints, logs and the final model/ go")
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        help="continue from the newest checkpoint, or 'auto': the newest intact one, or DIR: that one",
    )
    p.add_argument("--eval_split", default="validation", choices=("train", "validation"), help="split for eval")
    p.add_argument("--stop_at_step", type=int, help="stop after this step as if interrupted (checkpoint saved)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        overrides = parse_overrides(rest)
        for key, value in (
            ("run_mode", args.run_mode),
            ("device_target", args.device_target),
            ("data.dataset_dir", args.dataset_dir),
            ("model.pretrained", args.load_checkpoint),
            ("output_dir", args.output_dir),
            ("seed", args.seed),
        ):
            if value is not None:
                overrides[key] = value
        cfg = load_config(args.config, overrides)

        from tools.training.trainer import evaluate, run

        if cfg.run_mode == "eval":
            print(evaluate(cfg, split=args.eval_split).format())
            return 0
        result = run(cfg, resume=args.resume, stop_at_step=args.stop_at_step)
    except (ConfigError, DatasetError, CheckpointError, FileNotFoundError, FileExistsError, FloatingPointError) as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 2
    if result.model_dir is None:
        print(f"stopped at step {result.step}; continue with --resume")
    else:
        ppl = f", validation perplexity {result.val_ppl:.2f}" if result.val_ppl is not None else ""
        print(
            f"done: {result.step} steps in {result.seconds:.0f} s ({result.tokens_per_s:,.0f} tokens/s){ppl}; "
            f"model directory {result.model_dir}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
