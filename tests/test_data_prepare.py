"""tools/prepare_data.py: samples of exactly seq_length + 1 tokens that decode back to the text; splits; errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tokenizer import GPT2Tokenizer
from tools.prepare_data import DataError, main, prepare, split_wikitext
from tools.training.data import BatchPlan, DatasetError, load_samples, read_meta

DATA = Path(__file__).parent / "data"
SONNETS = DATA / "sonnets.txt"
EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def tok():
    return GPT2Tokenizer.from_pretrained("gpt2")


def test_samples_have_seq_length_plus_one_tokens_and_decode_to_the_text(tmp_path, tok):
    summary = prepare(inputs=[SONNETS], output_dir=tmp_path / "d", seq_length=48, val_fraction=0.0, progress=False)
    rows = load_samples(tmp_path / "d", "train", seq_length=48)
    assert rows.shape == (summary.train.samples, 49) and rows.dtype == np.int32
    # Non-overlapping samples: together they are the text (+ <|endoftext|>) up to the dropped tail.
    text = SONNETS.read_text(encoding="utf-8") + EOT
    decoded = tok.decode(rows.ravel().tolist())
    assert text.startswith(decoded)
    n_tokens = len(tok.encode(SONNETS.read_text(encoding="utf-8"))) + 1
    assert summary.train.tokens == n_tokens
    assert summary.train.dropped_tokens == n_tokens - rows.size < 49
    assert not (tmp_path / "d" / "validation.mindrecord").exists()
    meta = read_meta(tmp_path / "d")
    assert meta["seq_length"] == 48 and meta["train"]["samples"] == len(rows)


def test_documents_are_joined_with_endoftext_and_split_by_document(tmp_path, tok):
    docs = tmp_path / "docs"
    docs.mkdir()
    texts = [f"Document number {i}. " + "Some words here. " * (20 + i) for i in range(6)]
    for i, t in enumerate(texts):
        (docs / f"{i}.txt").write_text(t, encoding="utf-8")
    (docs / "empty.txt").write_text("  \n", encoding="utf-8")
    (docs / "ignored.md").write_text("not matched by the pattern", encoding="utf-8")
    s = prepare(inputs=[docs], output_dir=tmp_path / "d", seq_length=16, val_fraction=0.34, seed=3, progress=False)
    assert (s.split_method, s.train.documents, s.validation.documents, s.skipped_empty) == ("documents", 4, 2, 1)
    meta = read_meta(tmp_path / "d")
    val_names = {Path(n).name for n in meta["validation_documents"]}
    train_text = tok.decode(load_samples(tmp_path / "d", "train").ravel().tolist())
    val_text = tok.decode(load_samples(tmp_path / "d", "validation").ravel().tolist())
    for i, t in enumerate(texts):
        # Each document lands whole in one split, followed by <|endoftext|> (unless cut off in the dropped tail).
        where = val_text if f"{i}.txt" in val_names else train_text
        other = train_text if where is val_text else val_text
        assert t[:40] in where and t[:40] not in other
    assert train_text.count(EOT) >= 3


def test_one_document_splits_at_the_tail(tmp_path, tok):
    s = prepare(inputs=[SONNETS], output_dir=tmp_path / "d", seq_length=32, val_fraction=0.1, progress=False)
    assert s.split_method == "tail"
    val = tok.decode(load_samples(tmp_path / "d", "validation").ravel().tolist())
    assert "Which I new pay as if not paid before" in val  # near the end of the text


def test_explicit_validation_files(tmp_path):
    s = prepare(inputs=[SONNETS], validation_inputs=[SONNETS], output_dir=tmp_path / "d", seq_length=32, progress=False)
    assert s.split_method == "explicit" and s.train.samples == s.validation.samples


def test_wikitext_articles():
    raw = " = Alpha = \n text a \n = = Section = = \n more a \n = Beta = \n text b \n"
    assert split_wikitext(raw) == [" = Alpha = \n text a \n = = Section = = \n more a \n", " = Beta = \n text b \n"]


def test_wikitext_raw_file_is_split_into_documents(tmp_path):
    raw = "".join(f" = Title {i} = \n\n {'word ' * 30}\n\n = = Part = = \n\n {'more ' * 10}\n" for i in range(5))
    f = tmp_path / "wiki.train.raw"
    f.write_text(raw, encoding="utf-8")
    s = prepare(inputs=[f], output_dir=tmp_path / "d", seq_length=16, val_fraction=0.2, progress=False)
    assert (s.train.documents, s.validation.documents) == (4, 1)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: p / "missing.txt", "does not exist"),
        (lambda p: _write(p / "empty.txt", b"\n\n"), "no text"),
        (lambda p: _write(p / "bin.txt", b"\xff\xfe\x00abc"), "not UTF-8"),
        (lambda p: _write(p / "short.txt", b"Too short."), "fewer than one sample"),
        (lambda p: (p / "emptydir").mkdir() or p / "emptydir", "no files matching"),
    ],
)
def test_bad_inputs_are_clear_errors_with_exit_code_2(tmp_path, capsys, setup, message):
    src = setup(tmp_path)
    with pytest.raises(DataError, match=message):
        prepare(inputs=[src], output_dir=tmp_path / "out", seq_length=64, progress=False)
    assert main(["--input", str(src), "--output", str(tmp_path / "out"), "--seq_length", "64", "--no_progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prepare_data: error:") and message in err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_existing_output_needs_overwrite_and_is_replaced_whole(tmp_path):
    out = tmp_path / "d"
    prepare(inputs=[SONNETS], output_dir=out, seq_length=32, val_fraction=0.0, progress=False)
    with pytest.raises(DataError, match="--overwrite"):
        prepare(inputs=[SONNETS], output_dir=out, seq_length=64, val_fraction=0.0, progress=False)
    prepare(inputs=[SONNETS], output_dir=out, seq_length=64, val_fraction=0.0, overwrite=True, progress=False)
    assert load_samples(out, "train").shape[1] == 65
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temporary or old directories left


def test_loading_with_the_wrong_seq_length_says_how_to_fix_it(tmp_path):
    prepare(inputs=[SONNETS], output_dir=tmp_path / "d", seq_length=32, val_fraction=0.0, progress=False)
    with pytest.raises(DatasetError, match="data.seq_length 32"):
        load_samples(tmp_path / "d", "train", seq_length=64)
    with pytest.raises(DatasetError, match="no validation split"):
        load_samples(tmp_path / "d", "validation")


def test_batch_plan_covers_each_epoch_once_and_splits_rows_between_processes():
    n = 24
    single = BatchPlan(n, micro_batch=4, grad_accum_steps=1, world_size=1, rank=0, seed=5)
    seen = np.concatenate([single.indices(s, 0) for s in range(6)])
    assert sorted(seen.tolist()) == list(range(n))  # one epoch = every sample once
    # Two processes with 2 rows and 2 micro-steps each read exactly the one process's global batch.
    for step in range(9):
        parts = [
            BatchPlan(n, micro_batch=1, grad_accum_steps=2, world_size=2, rank=r, seed=5).indices(step, m)
            for m in range(2)
            for r in range(2)
        ]
        assert np.concatenate(parts).tolist() == single.indices(step, 0).tolist()
    # The next epoch uses a different order.
    assert single.indices(6, 0).tolist() != single.indices(0, 0).tolist()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
