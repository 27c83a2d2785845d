"""Settings from defaults, environment and command line; the CLI's start-up banner and argument errors."""

import pytest

from serving.__main__ import main
from serving.config import EngineConfig, ModelInfo, Settings


def test_defaults_environment_then_command_line():
    s = Settings.from_sources([], environ={})
    assert s.host == "127.0.0.1" and s.max_batch_size == 16 and s.api_key is None
    env = {"GPT2_MAX_BATCH_SIZE": "8", "GPT2_PORT": "9000", "GPT2_API_KEY": "s3cr3t-key", "GPT2_WARMUP": "false",
           "GPT2_QUEUE_TIMEOUT": "2.5"}
    s = Settings.from_sources(["--port", "9100", "--max-queue", "3"], environ=env)
    assert (s.max_batch_size, s.port, s.max_queue, s.api_key, s.warmup, s.queue_timeout) == (8, 9100, 3, "s3cr3t-key", False, 2.5)
    assert "s3cr3t" not in repr(s)  # the key stays out of logs


def test_batching_defaults_and_packed_prefill_settings():
    s = Settings.from_sources([], environ={})
    assert (s.decode_batching, s.prefill_chunk, s.max_prefill_tokens) == ("bucketed", 256, 256)
    s = Settings.from_sources(["--max-prefill-tokens", "512", "--decode-batching", "fixed"],
                              environ={"GPT2_PREFILL_CHUNK": "64"})
    assert (s.decode_batching, s.prefill_chunk, s.max_prefill_tokens) == ("fixed", 64, 512)
    info = ModelInfo(n_positions=1024, vocab_size=50257, eos_token_id=50256)
    cfg = EngineConfig.from_settings(Settings(), info)
    assert cfg.packed_prefill and cfg.max_prefill_tokens == 256 and cfg.chunk_buckets == (1, 16, 64, 96, 128, 192, 256)
    assert not EngineConfig.from_settings(Settings(decode_batching="fixed"), info).packed_prefill


@pytest.mark.parametrize("argv, env", [
    (["--max-batch-size", "0"], {}),
    (["--decode-batching", "sometimes"], {}),
    ([], {"GPT2_MAX_QUEUE": "lots"}),
    (["--port", "70000"], {}),
    (["--max-prefill-tokens", "0"], {}),
])
def test_invalid_settings_are_refused(argv, env):
    with pytest.raises((ValueError, SystemExit)):
        Settings.from_sources(argv, environ=env)


def test_engine_config_is_capped_by_the_model():
    info = ModelInfo(n_positions=128, vocab_size=50257, eos_token_id=50256)
    cfg = EngineConfig.from_settings(Settings(prefill_chunk=512), info)
    assert cfg.max_total_tokens == 128 and cfg.prefill_chunk == 128
    with pytest.raises(ValueError, match="context window"):
        EngineConfig.from_settings(Settings(max_total_tokens=4096), info)


def test_cli_errors_are_short_messages(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GPT2_MODEL", raising=False)
    assert main([]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["--model", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err
