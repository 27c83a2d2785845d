"""`Trainer(task="text_generation", model=..., train_dataset=...)`: the MindFormers Trainer over tools/train.py.

    trainer = Trainer(task="text_generation", model="gpt2", train_dataset="my_texts/",
                      config={"train.max_steps": 200})
    trainer.train()        # pre-train from scratch with the architecture of `model`
    trainer.finetune()     # or continue from `model`'s weights
    trainer.evaluate()     # validation perplexity
    trainer.predict(input_data="I love Beijing, because")

`train_dataset` is a directory made by tools/prepare_data.py, a .mindrecord file, or raw text (a .txt file or
a folder of them), which is prepared into output_dir/data-SEQ_LENGTH first. `config` is a YAML path, or a dict of
dotted keys (`{"train.lr": 1e-3}`) applied over configs/gpt2/run_gpt2_default.yaml's values for CPU training.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from tools.training.config import RunConfig, load_config

from .models import REPO_ROOT, ensure_device, resolve_model_dir
from .pipeline import TextGenerationPipeline, pipeline

TASKS = ("text_generation", "text-generation")
DEFAULT_CONFIG = REPO_ROOT / "configs" / "gpt2" / "run_gpt2_default.yaml"


class Trainer:
    def __init__(
        self,
        task: str = "text_generation",
        model: str | os.PathLike = "gpt2",
        train_dataset: str | os.PathLike | None = None,
        eval_dataset: str | os.PathLike | None = None,
        *,
        config: str | os.PathLike | dict[str, Any] | None = None,
        output_dir: str | os.PathLike = "runs/trainer",
        seq_length: int | None = None,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"unsupported task {task!r}; the Trainer supports {', '.join(map(repr, TASKS))}")
        self.model_dir = resolve_model_dir(model)
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.output_dir = Path(output_dir)
        self._config_source = config
        self._seq_length = seq_length
        self._trained_dir: Path | None = None
        self._pipeline: TextGenerationPipeline | None = None
        self.last_result = None

    # ---- config ------------------------------------------------------------------------------------------

    def _config(self, run_mode: str, dataset_source: str | os.PathLike | None, pretrained: Path) -> RunConfig:
        from model import GPT2Config

        path, user = DEFAULT_CONFIG, {}
        if isinstance(self._config_source, (str, os.PathLike)):
            path = Path(self._config_source)
        elif isinstance(self._config_source, dict):
            user = dict(self._config_source)
        elif self._config_source is not None:
            raise TypeError(f"config must be a YAML path or a dict of dotted keys, got {type(self._config_source)}")
        base = load_config(path, user)
        model_cfg = GPT2Config.from_json(pretrained)
        seq = self._seq_length or min(base.data.seq_length, model_cfg.n_positions)
        # The architecture is the model directory's; the config may only add settings such as dropout.
        settings = {k: v for k, v in base.model.config.items() if k not in _ARCH_KEYS}
        model = dataclasses.replace(base.model, pretrained=str(pretrained), config=settings)
        if run_mode == "train":
            # From scratch: a fresh model of that architecture.
            arch = {k: v for k, v in model_cfg.to_dict().items() if k in _ARCH_KEYS}
            model = dataclasses.replace(base.model, pretrained=None, preset="gpt2", config={**settings, **arch})
        return dataclasses.replace(
            base,
            run_mode=run_mode,
            output_dir=str(self.output_dir),
            model=model,
            data=dataclasses.replace(base.data, seq_length=seq, dataset_dir=self._dataset(dataset_source, seq)),
        )

    def _dataset(self, source: str | os.PathLike | None, seq_length: int) -> str:
        if source is None:
            raise ValueError("this Trainer has no train_dataset")
        path = Path(source)
        if (path.is_dir() and (path / "train.mindrecord").is_file()) or path.suffix == ".mindrecord":
            return str(path)
        # Raw text: prepared once per sequence length.
        from tools.prepare_data import prepare

        out = self.output_dir / f"data-{seq_length}"
        if not (out / "train.mindrecord").is_file():
            prepare(inputs=[path], output_dir=out, seq_length=seq_length, progress=False, require_validation=False)
        return str(out)

    # ---- the MindFormers verbs ---------------------------------------------------------------------------

    def train(self, *, resume: bool = False):
        """Pre-train from scratch (the architecture of `model`, new weights); returns tools' RunResult."""
        return self._run("train", resume)

    def finetune(self, *, resume: bool = False):
        """Continue training from the weights of `model`."""
        return self._run("finetune", resume)

    def _run(self, mode: str, resume: bool):
        from tools.training.trainer import run

        ensure_device()
        self.last_result = run(self._config(mode, self.train_dataset, self.model_dir), resume=resume)
        self._trained_dir = self.last_result.model_dir
        self._pipeline = None
        return self.last_result

    def evaluate(self, eval_dataset: str | os.PathLike | None = None):
        """Perplexity of the trained model (or `model`) on the validation split; returns tools' EvalReport."""
        from tools.training.trainer import evaluate

        ensure_device()
        source = eval_dataset or self.eval_dataset or self.train_dataset
        cfg = self._config("eval", source, self._trained_dir or self.model_dir)
        has_validation = (Path(cfg.data.dataset_dir) / "validation.mindrecord").is_file()
        return evaluate(cfg, split="validation" if has_validation else "train")

    def predict(self, input_data: str | list[str], **generate_kwargs: Any) -> list[dict[str, list[str]]]:
        """Generate from the trained model (or `model`); see textgen.pipeline for the keyword arguments."""
        if self._pipeline is None:
            self._pipeline = pipeline("text_generation", model=self._trained_dir or self.model_dir)
        return self._pipeline(input_data, **generate_kwargs)


_ARCH_KEYS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function")
