"""Server settings in one place: defaults, then environment variables (GPT2_<NAME>), then command-line flags.

`Settings` is what the process is told; `EngineConfig` is the part the engine needs once the model's own limits
(context window, vocabulary) are known. Knows nothing of FastAPI or MindSpore.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_PREFIX = "GPT2_"
DEVICE_TARGETS = ("CPU", "GPU", "Ascend")
ACCESS_LOG = ("json", "off")
QUANTIZE = ("int8",)


@dataclass(frozen=True)
class Settings:
    model: str | None = None  # model directory: config.json, weights, tokenizer files
    served_model_name: str | None = None  # the name clients use (`model` in /v1); default: the directory name
    host: str = "127.0.0.1"  # loopback by default: exposing the server is a deliberate choice
    port: int = 8000  # 0 picks a free port (printed on start)
    max_batch_size: int = 16  # KV-cache slots = sequences decoding at once
    max_queue: int = 64  # waiting requests beyond the running ones; more are refused with 429
    queue_timeout: float | None = None  # seconds a request may wait for a slot before it fails (503)
    max_total_tokens: int | None = None  # prompt + new tokens per request; default and cap: the context window
    # Tokens one step computes, in one pass: every running request's next token plus prompt tokens of waiting ones,
    # oldest first (vLLM's max_num_batched_tokens). It bounds how long a step delays the running requests' next
    # token; larger budgets bought no throughput in bench/sim_scheduler.py (docs/PERFORMANCE.md).
    max_batched_tokens: int = 256
    # Most prompt tokens of one request per step: a longer prompt is prefilled in chunks over several steps.
    prefill_chunk: int = 256
    # A short prompt (at most this many tokens to compute) starts only while the step's short prompts hold fewer
    # than this many tokens, and is held back two steps at most (0: off): requests that start together finish
    # together and closed-loop clients come back together (serving/engine/scheduler.py; docs/PERFORMANCE.md).
    stagger_tokens: int = 32
    warmup: bool = True  # compile the common step shapes before reporting healthy
    # Automatic prefix caching: a prompt that begins with tokens whose K/V some slot still holds starts after them
    # (serving/engine/prefix_cache.py); --no-prefix-caching computes every prompt in full.
    prefix_caching: bool = True
    # Directory for MindSpore's compiled-graph cache (restarts skip compilation), one subdirectory per model
    # architecture and session layout; "off" (--no-compile-cache) compiles at every start.
    compile_cache: str = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpt2-mindspore"
                             / "graphs")
    device_target: str = "CPU"  # MindSpore device: CPU, GPU or Ascend
    # "int8": projections, LM head and embedding as int8 with per-row scales (model/quantize.py); a quantized model
    # directory is served int8 without it.
    quantize: str | None = None
    compute_dtype: str = "float32"
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_n: int = 16  # OpenAI `n` (completions per prompt)
    max_score_texts: int = 64
    max_body_bytes: int = 2 * 1024 * 1024
    shutdown_timeout: float = 30.0  # seconds running requests may take to finish on shutdown
    # Slow and idle clients (uvicorn alone waits forever for a request's headers and body).
    header_timeout: float = 10.0  # seconds from a connection's first byte (or its opening) to the end of headers
    body_timeout: float = 30.0  # seconds a request's whole body may take to arrive
    keep_alive_timeout: float = 5.0  # seconds an idle keep-alive connection stays open between requests
    max_connections: int = 512  # open connections (and requests in flight) before new requests get 503
    api_key: str | None = dataclasses.field(default=None, repr=False)  # from GPT2_API_KEY only
    log_level: str = "info"
    # "json": one JSON line per request on stdout (logger `serving.access`: request id, route, status, tokens,
    # queue/TTFT/total time), independent of --log-level and of uvicorn's plain-text access log; "off": none.
    access_log: str = "json"
    ui: bool = True  # the web playground at GET / (serving/ui/); --no-ui leaves GET / unrouted
    # /v1/chat/completions: a Jinja2 chat template (Hugging Face's `chat_template` convention), a file or the
    # template text itself; default: the model directory's own (chat_template.jinja, else tokenizer_config.json).
    # GPT-2 has none.
    chat_template: str | None = None

    def __post_init__(self) -> None:
        positive = (
            "max_batch_size", "prefill_chunk", "max_batched_tokens", "max_stop_sequences", "max_n", "max_score_texts",
            "max_body_bytes", "max_connections",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_queue", "stagger_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_total_tokens is not None and self.max_total_tokens < 2:
            raise ValueError(f"max_total_tokens must be >= 2, got {self.max_total_tokens}")
        if self.queue_timeout is not None and self.queue_timeout <= 0:
            raise ValueError(f"queue_timeout must be > 0, got {self.queue_timeout}")
        for name in ("shutdown_timeout", "header_timeout", "body_timeout", "keep_alive_timeout"):
            value = getattr(self, name)
            if not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a positive number of seconds, got {value}")
        if self.max_batched_tokens <= self.max_batch_size:
            raise ValueError(
                f"max_batched_tokens ({self.max_batched_tokens}) must exceed max_batch_size ({self.max_batch_size}): "
                "a step must have room for a prompt token after every running request's next token"
            )
        if self.access_log not in ACCESS_LOG:
            raise ValueError(f"access_log must be one of {ACCESS_LOG}, got {self.access_log!r}")
        if self.quantize not in (None, *QUANTIZE):
            raise ValueError(f"quantize must be one of {QUANTIZE}, got {self.quantize!r}")
        if self.device_target not in DEVICE_TARGETS:
            raise ValueError(f"device_target must be one of {DEVICE_TARGETS}, got {self.device_target!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")

    @property
    def compile_cache_dir(self) -> str | None:
        off = self.compile_cache.strip().lower() in ("", "off", "none", "0", "false", "no")
        return None if off else self.compile_cache

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        return Path(self.model).name if self.model else "gpt2"

    @classmethod
    def from_sources(cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> "Settings":
        """Defaults < environment (GPT2_MAX_BATCH_SIZE=...) < command line (--max-batch-size ...)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _parse(f, raw)
        args = build_parser().parse_args(argv)
        for name, value in vars(args).items():
            if value is not None:
                values[name] = value
        return cls(**values)


def _parse(f: dataclasses.Field, raw: str) -> Any:
    kind = str(f.type)
    try:
        if "bool" in kind:
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes")
        if "int" in kind:
            return int(raw)
        if "float" in kind:
            return float(raw)
    except ValueError:
        raise ValueError(f"environment variable {ENV_PREFIX}{f.name.upper()}={raw!r} is not a valid {kind}") from None
    return raw


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpt2-serve",
        description="GPT-2 text-generation server (TGI- and OpenAI-compatible). "
        f"Every option can also be set as an environment variable {ENV_PREFIX}<OPTION> (e.g. GPT2_MAX_QUEUE); "
        "the API key is read from GPT2_API_KEY only.",
    )
    a = p.add_argument
    a("--model", help="model directory (config.json, weights, tokenizer files)")
    a("--served-model-name", help="model name reported to clients (default: the directory name)")
    a("--host", help="bind address (default 127.0.0.1)")
    a("--port", type=int, help="port (default 8000; 0 = any free port)")
    a("--max-batch-size", type=int, help="KV-cache slots = sequences decoding together (default 16)")
    a("--max-queue", type=int, help="waiting requests before new ones get 429 (default 64)")
    a("--queue-timeout", type=float, help="seconds a request may wait for a slot (default: no limit)")
    a("--max-total-tokens", type=int, help="prompt + generated tokens per request (default: the context window)")
    a("--max-batched-tokens", type=int,
      help="tokens per step, running requests' next tokens and waiting prompts' tokens together (default 256)")
    a("--prefill-chunk", type=int, help="most prompt tokens of one request per step (default 256)")
    a("--stagger-tokens", type=int,
      help="a short prompt (at most this many tokens to compute) starts only while the step's short prompts hold "
      "fewer than this many tokens, and is held back two steps at most, so requests arriving together do not all "
      "decode and finish together (default 32; 0: off)")
    a("--warmup", action=argparse.BooleanOptionalAction, default=None, help="compile common shapes at start")
    a("--prefix-caching", action=argparse.BooleanOptionalAction, default=None,
      help="reuse the K/V of prompt prefixes still in the cache (default on; --no-prefix-caching turns it off)")
    a("--compile-cache", metavar="DIR",
      help="directory for MindSpore's compiled-graph cache (default ~/.cache/gpt2-mindspore/graphs)")
    a("--no-compile-cache", dest="compile_cache", action="store_const", const="off",
      help="compile the step graph at every start")
    a("--device-target", choices=DEVICE_TARGETS, help="MindSpore device (default CPU)")
    a("--compute-dtype", choices=("float32", "float16", "bfloat16"), help="matmul dtype (float16/bfloat16 for Ascend)")
    a("--quantize", choices=QUANTIZE,
      help="int8: weights as int8 with a float32 scale per output row, quantized at load (a directory written by "
      "tools/convert_weight.py --quantize int8 is served int8 as it is); needs the CPU kernels")
    a("--max-stop-sequences", type=int)
    a("--max-top-n-tokens", type=int)
    a("--max-n", type=int)
    a("--max-score-texts", type=int)
    a("--max-body-bytes", type=int)
    a("--shutdown-timeout", type=float, help="seconds running requests may finish on shutdown (default 30)")
    a("--header-timeout", type=float, help="seconds a client may take to send a request's headers (default 10)")
    a("--body-timeout", type=float, help="seconds a client may take to send a request's body (default 30)")
    a("--keep-alive-timeout", type=float, help="seconds an idle keep-alive connection stays open (default 5)")
    a("--max-connections", type=int,
      help="open connections before new requests get 503 (default 512; mind the process's file limit)")
    a("--log-level", choices=("critical", "error", "warning", "info", "debug"))
    a("--access-log", choices=ACCESS_LOG,
      help="json (default): one JSON line per request on stdout, whatever --log-level says; off: none")
    a("--ui", action=argparse.BooleanOptionalAction, default=None,
      help="serve the web playground at GET / (default on; --no-ui turns it off)")
    a("--chat-template", metavar="FILE",
      help="Jinja2 chat template for /v1/chat/completions (a file, or the template text itself), in Hugging "
      "Face's chat_template format; default: the model directory's chat_template.jinja or tokenizer_config.json "
      "`chat_template`")
    return p


@dataclass(frozen=True)
class ModelInfo:
    """What the server needs to know about a model directory before loading the weights."""

    n_positions: int
    vocab_size: int
    eos_token_id: int
    quantized: bool = False  # config.json records int8 weights (model/quantize.py)

    @classmethod
    def from_dir(cls, model_dir: str) -> "ModelInfo":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ValueError(f"{model_dir!r} is not a model directory: {path} is missing")
        cfg = json.loads(path.read_text())
        return cls(
            n_positions=int(cfg.get("n_positions", cfg.get("n_ctx", 1024))),
            vocab_size=int(cfg.get("vocab_size", 50257)),
            eos_token_id=int(cfg.get("eos_token_id", 50256)),
            # model.quantize.QUANT_METHOD (not imported: this module stays free of MindSpore)
            quantized=(cfg.get("quantization_config") or {}).get("quant_method") == "gpt2_int8_weight_only",
        )


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 16
    max_queue: int = 64
    queue_timeout: float | None = None
    max_total_tokens: int = 1024
    max_batched_tokens: int = 256
    prefill_chunk: int = 256
    stagger_tokens: int = 32
    prefix_caching: bool = True
    quantize: str | None = None  # the weights' form: Settings.quantize, or "int8" for a quantized directory
    prefix_block: int = 16  # tokens per prefix-cache block (vLLM's default block size)
    # Consecutive failed steps after which the engine declares itself dead (each failure fails its requests).
    max_consecutive_failures: int = 3

    @property
    def max_step_tokens(self) -> int:
        """Tokens in one step's pass: the largest chunk bucket."""
        return self.chunk_buckets[-1]

    @property
    def batch_buckets(self) -> tuple[int, ...]:
        """Row counts a row-shaped step is padded to (no CPU kernels): powers of two up to max_batch_size."""
        out, b = [], 1
        while b < self.max_batch_size:
            out.append(b)
            b *= 2
        return tuple(out) + (self.max_batch_size,)

    @property
    def chunk_buckets(self) -> tuple[int, ...]:
        """Token counts a step's pass is padded to: powers of two up to 64 (decode steps of a few requests pad
        little), then 64, 96, 128, 192, ... (at most 1.5 times the tokens: a pass costs about as much per padded
        token as per real one) and max_batched_tokens itself (also the cap)."""
        c = self.max_batched_tokens
        out, b = {c}, 1
        while b < c:
            out.add(b)
            if b >= 64 and b * 3 // 2 < c:
                out.add(b * 3 // 2)
            b *= 2
        return tuple(sorted(out))

    @classmethod
    def from_settings(cls, s: Settings, info: ModelInfo) -> "EngineConfig":
        total = info.n_positions if s.max_total_tokens is None else s.max_total_tokens
        if total > info.n_positions:
            raise ValueError(f"max_total_tokens {total} exceeds the model's context window {info.n_positions}")
        batched = min(s.max_batched_tokens, total)
        if batched <= s.max_batch_size:
            raise ValueError(
                f"max_batched_tokens ({batched}, capped by max_total_tokens) must exceed max_batch_size "
                f"({s.max_batch_size})"
            )
        return cls(
            max_batch_size=s.max_batch_size,
            max_queue=s.max_queue,
            queue_timeout=s.queue_timeout,
            max_total_tokens=total,
            max_batched_tokens=batched,
            prefill_chunk=min(s.prefill_chunk, batched),
            stagger_tokens=s.stagger_tokens,
            prefix_caching=s.prefix_caching,
            quantize=s.quantize or ("int8" if info.quantized else None),
        )
