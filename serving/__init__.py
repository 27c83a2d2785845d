"""Online text generation for GPT-2: continuous-batching engine and TGI- / OpenAI-compatible HTTP API.

Layout: `config` (settings), `sampling_params`, `sampler` (numpy), `engine/` (sequence, scheduler, model runner,
engine thread), `api/` (FastAPI app). Only `engine/model_runner.py` calls the model package.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gpt2-mindspore-server")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without installing
    __version__ = "0.0.0"
