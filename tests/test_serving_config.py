"""Settings from defaults, environment and command line; the engine config derived from them (token budget, chunk
and batch buckets); the CLI's start-up banner and argument errors."""

import pytest

from serving.__main__ import main
from serving.config import EngineConfig, ModelInfo, Settings

GPT2 = ModelInfo(n_positions=1024, vocab_size=50257, eos_token_id=50256)


def test_defaults_environment_then_command_line():
    s = Settings.from_sources([], environ={})
    assert s.host == "127.0.0.1" and s.max_batch_size == 16 and s.api_key is None
    env = {"GPT2_MAX_BATCH_SIZE": "8", "GPT2_PORT": "9000", "GPT2_API_KEY": "s3cr3t-key", "GPT2_WARMUP": "false",
           "GPT2_QUEUE_TIMEOUT": "2.5"}
    s = Settings.from_sources(["--port", "9100", "--max-queue", "3"], environ=env)
    assert (s.max_batch_size, s.port, s.max_queue, s.api_key, s.warmup, s.queue_timeout) == (8, 9100, 3, "s3cr3t-key", False, 2.5)
    assert "s3cr3t" not in repr(s)  # the key stays out of logs


def test_token_budget_defaults():
    s = Settings.from_sources([], environ={})
    assert (s.max_batched_tokens, s.prefill_chunk) == (256, 256)
    # The removed options are gone from the settings.
    assert not hasattr(s, "decode_batching") and not hasattr(s, "max_prefill_tokens")


def test_max_batched_tokens_from_environment_then_command_line():
    s = Settings.from_sources([], environ={"GPT2_MAX_BATCHED_TOKENS": "512", "GPT2_PREFILL_CHUNK": "64"})
    assert (s.max_batched_tokens, s.prefill_chunk) == (512, 64)
    s = Settings.from_sources(["--max-batched-tokens", "128"], environ={"GPT2_MAX_BATCHED_TOKENS": "512"})
    assert s.max_batched_tokens == 128
    s = Settings.from_sources(["--max-batched-tokens", "1024", "--prefill-chunk", "32"], environ={})
    assert (s.max_batched_tokens, s.prefill_chunk) == (1024, 32)
    with pytest.raises(ValueError, match="GPT2_MAX_BATCHED_TOKENS"):
        Settings.from_sources([], environ={"GPT2_MAX_BATCHED_TOKENS": "lots"})


def test_stagger_tokens_default_environment_command_line_and_engine_config():
    assert Settings.from_sources([], environ={}).stagger_tokens == 32
    s = Settings.from_sources([], environ={"GPT2_STAGGER_TOKENS": "0"})
    assert s.stagger_tokens == 0 and EngineConfig.from_settings(s, GPT2).stagger_tokens == 0
    s = Settings.from_sources(["--stagger-tokens", "64"], environ={"GPT2_STAGGER_TOKENS": "0"})
    assert EngineConfig.from_settings(s, GPT2).stagger_tokens == 64
    with pytest.raises(ValueError, match="stagger_tokens must be >= 0"):
        Settings(stagger_tokens=-1)


def test_max_batched_tokens_must_exceed_max_batch_size():
    with pytest.raises(ValueError, match="max_batched_tokens .* must exceed max_batch_size"):
        Settings(max_batch_size=16, max_batched_tokens=16)
    with pytest.raises(ValueError, match="must exceed"):
        Settings(max_batch_size=32, max_batched_tokens=20)
    assert Settings(max_batch_size=16, max_batched_tokens=17).max_batched_tokens == 17
    with pytest.raises(ValueError, match="must exceed"):
        Settings.from_sources(["--max-batch-size", "256"], environ={})  # the default budget is 256
    with pytest.raises(ValueError, match="must exceed"):
        Settings.from_sources([], environ={"GPT2_MAX_BATCH_SIZE": "8", "GPT2_MAX_BATCHED_TOKENS": "8"})
    assert Settings.from_sources(["--max-batch-size", "64"], environ={}).max_batch_size == 64


@pytest.mark.parametrize("flag", [["--decode-batching", "fixed"], ["--max-prefill-tokens", "512"]])
def test_removed_options_are_rejected_by_the_command_line(flag, capsys):
    with pytest.raises(SystemExit) as e:
        Settings.from_sources(flag, environ={})
    assert e.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize("argv, env", [
    (["--max-batch-size", "0"], {}),
    ([], {"GPT2_MAX_QUEUE": "lots"}),
    (["--port", "70000"], {}),
    (["--max-batched-tokens", "0"], {}),
    (["--prefill-chunk", "0"], {}),
    (["--max-batched-tokens", "many"], {}),
    (["--queue-timeout", "0"], {}),
    (["--stagger-tokens", "-1"], {}),
    ([], {"GPT2_STAGGER_TOKENS": "1e9"}),
])
def test_invalid_settings_are_refused(argv, env):
    with pytest.raises((ValueError, SystemExit)):
        Settings.from_sources(argv, environ=env)


def test_engine_config_defaults():
    cfg = EngineConfig.from_settings(Settings(), GPT2)
    assert (cfg.max_batch_size, cfg.max_total_tokens) == (16, 1024)
    assert (cfg.max_batched_tokens, cfg.prefill_chunk, cfg.max_step_tokens) == (256, 256, 256)
    assert cfg.chunk_buckets == (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256)
    assert cfg.batch_buckets == (1, 2, 4, 8, 16)
    assert not hasattr(cfg, "packed_prefill") and not hasattr(cfg, "max_prefill_tokens")


def test_engine_config_takes_the_settings_budget_and_caps_the_chunk_at_it():
    cfg = EngineConfig.from_settings(Settings(max_batched_tokens=512, prefill_chunk=64), GPT2)
    assert (cfg.max_batched_tokens, cfg.prefill_chunk, cfg.max_step_tokens) == (512, 64, 512)
    assert cfg.chunk_buckets == (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512)
    cfg = EngineConfig.from_settings(Settings(max_batched_tokens=128, prefill_chunk=512), GPT2)
    assert (cfg.max_batched_tokens, cfg.prefill_chunk, cfg.max_step_tokens) == (128, 128, 128)


@pytest.mark.parametrize("budget, buckets", [
    (256, (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256)),
    (100, (1, 2, 4, 8, 16, 32, 64, 96, 100)),
    (64, (1, 2, 4, 8, 16, 32, 64)),
    (17, (1, 2, 4, 8, 16, 17)),
    (1024, (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512, 768, 1024)),
])
def test_chunk_buckets(budget, buckets):
    cfg = EngineConfig(max_batched_tokens=budget)
    assert cfg.chunk_buckets == buckets and cfg.max_step_tokens == budget


@pytest.mark.parametrize("budget", [3, 17, 100, 200, 256, 300, 500, 777, 1024, 2048])
def test_chunk_buckets_pad_little_and_end_at_the_budget(budget):
    b = EngineConfig(max_batch_size=2, max_batched_tokens=budget).chunk_buckets
    assert b[0] == 1 and b[-1] == budget and list(b) == sorted(set(b))
    for lo, hi in zip(b, b[1:]):
        # Padding a pass to the next bucket at most doubles it, and at most adds half from 64 tokens up.
        assert hi <= 2 * lo and (lo < 64 or hi <= lo * 3 // 2 or hi == budget)


def test_batch_buckets():
    assert EngineConfig(max_batch_size=16).batch_buckets == (1, 2, 4, 8, 16)
    assert EngineConfig(max_batch_size=12).batch_buckets == (1, 2, 4, 8, 12)
    assert EngineConfig(max_batch_size=1).batch_buckets == (1,)


def test_engine_config_is_capped_by_the_model():
    info = ModelInfo(n_positions=128, vocab_size=50257, eos_token_id=50256)
    cfg = EngineConfig.from_settings(Settings(prefill_chunk=512), info)
    assert cfg.max_total_tokens == 128 and cfg.max_batched_tokens == 128 and cfg.prefill_chunk == 128
    assert cfg.max_step_tokens == 128 and cfg.chunk_buckets[-1] == 128
    with pytest.raises(ValueError, match="context window"):
        EngineConfig.from_settings(Settings(max_total_tokens=4096), info)


def test_the_budget_is_capped_by_max_total_tokens_and_must_still_exceed_the_batch_size():
    cfg = EngineConfig.from_settings(Settings(max_total_tokens=64), GPT2)
    assert (cfg.max_total_tokens, cfg.max_batched_tokens, cfg.prefill_chunk) == (64, 64, 64)
    assert cfg.chunk_buckets == (1, 2, 4, 8, 16, 32, 64)
    assert EngineConfig.from_settings(Settings(max_total_tokens=17), GPT2).max_batched_tokens == 17
    with pytest.raises(ValueError, match="max_batched_tokens .*must exceed max_batch_size"):
        EngineConfig.from_settings(Settings(max_total_tokens=16), GPT2)  # 16 tokens for 16 slots
    with pytest.raises(ValueError, match="must exceed"):
        EngineConfig.from_settings(Settings(max_batch_size=4, max_total_tokens=4), GPT2)
    small = ModelInfo(n_positions=16, vocab_size=50257, eos_token_id=50256)  # the context window caps it too
    with pytest.raises(ValueError, match="must exceed"):
        EngineConfig.from_settings(Settings(), small)
    assert EngineConfig.from_settings(Settings(max_batch_size=8), small).max_batched_tokens == 16


def test_cli_errors_are_short_messages(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GPT2_MODEL", raising=False)
    monkeypatch.delenv("GPT2_MAX_BATCHED_TOKENS", raising=False)
    monkeypatch.delenv("GPT2_MAX_BATCH_SIZE", raising=False)
    assert main([]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["--model", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err
    assert main(["--model", str(tmp_path), "--max-batched-tokens", "8"]) == 2
    assert "max_batched_tokens (8) must exceed max_batch_size (16)" in capsys.readouterr().err
