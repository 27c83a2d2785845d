"""GPT2Tokenizer: GPT-2's tokenizer as the rest of the project uses it.

Loading (the vocabulary shipped in ``tokenizer/data`` or any directory of vocabulary files), encoding
with GPT-2's special-token rule, decoding to bytes or text, batches, and the Hugging Face style
``tokenizer(texts, padding=..., max_length=..., return_tensors=...)`` call that returns ``input_ids``
and ``attention_mask``.

Special tokens: ``<|endoftext|>`` (id 50256) is the only one. Its text in user input is refused with
a ValueError unless the caller allows it (``allowed_special``), or asks for it to be encoded as
ordinary text (``disallowed_special=()``), as tiktoken does, so user text cannot inject it.

Lone surrogates: a ``str`` may hold code points U+D800..U+DFFF that have no UTF-8 form. Each one is
encoded as U+FFFD (the replacement character), so ``decode(encode(s))`` is ``s`` with every surrogate
code point replaced by U+FFFD, and exactly ``s`` for any ``s`` without them. (tiktoken differs only for
a high surrogate directly followed by a low one, which it joins into one character first.)

This module knows strings, bytes and ids; numpy and MindSpore are imported only when tensors are
asked for. It knows nothing about models or HTTP.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any, Literal

import regex

from tokenizer.bpe import DEFAULT_CACHE_SIZE, BytePairEncoding, symbols_to_bytes
from tokenizer.vocab_files import find_vocab_files, read_encoder, read_merges, write_vocab_files

ENDOFTEXT = "<|endoftext|>"

# Names from_pretrained() accepts besides a directory; nothing is ever downloaded.
PRETRAINED_VOCABULARIES: dict[str, Path] = {"gpt2": Path(__file__).resolve().parent / "data"}

_PADDING_MODES = {False: None, "do_not_pad": None, True: "longest", "longest": "longest", "max_length": "max_length"}
_TRUNCATION_MODES = {False: False, "do_not_truncate": False, True: True, "longest_first": True}
_RETURN_TENSORS = (None, "np", "ms")


class GPT2Tokenizer:
    """GPT-2's byte-level BPE tokenizer. Build it with ``GPT2Tokenizer.from_pretrained("gpt2" | dir)``."""

    def __init__(
        self,
        *,
        encoder: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        if ENDOFTEXT not in encoder:
            raise ValueError(f"the vocabulary has no {ENDOFTEXT!r} token; GPT-2's vocabulary ends with it")
        ids = sorted(encoder.values())
        if ids != list(range(len(ids))):
            raise ValueError("vocabulary ids must be exactly 0..N-1, each used once")
        self._encoder = dict(encoder)
        self._merges = list(merges)
        self._bpe = BytePairEncoding(encoder=self._encoder, merges=self._merges, cache_size=cache_size)
        self._special_tokens = {ENDOFTEXT: self._encoder[ENDOFTEXT]}
        self._special_pattern = regex.compile("|".join(regex.escape(token) for token in self._special_tokens))
        # The raw bytes of every id; special tokens decode to their own text, like tiktoken.
        self._id_to_bytes: dict[int, bytes] = {
            token_id: (token.encode("utf-8") if token in self._special_tokens else symbols_to_bytes(token))
            for token, token_id in self._encoder.items()
        }
        self._max_token_bytes = max(map(len, self._id_to_bytes.values()))

    @classmethod
    def from_pretrained(
        cls, name_or_directory: str | os.PathLike[str], *, cache_size: int = DEFAULT_CACHE_SIZE
    ) -> GPT2Tokenizer:
        """Load ``"gpt2"`` (the vocabulary shipped with this package) or a directory holding
        ``encoder.json`` + ``vocab.bpe`` or Hugging Face's ``vocab.json`` + ``merges.txt``."""
        if isinstance(name_or_directory, str) and name_or_directory in PRETRAINED_VOCABULARIES:
            directory = PRETRAINED_VOCABULARIES[name_or_directory]
        else:
            directory = Path(name_or_directory)
            if not directory.is_dir():
                raise FileNotFoundError(
                    f"{os.fspath(name_or_directory)!r} is neither a known vocabulary "
                    f"({', '.join(map(repr, PRETRAINED_VOCABULARIES))}) nor a directory; pass one of those "
                    "names or a directory with encoder.json + vocab.bpe (or vocab.json + merges.txt). "
                    "Vocabularies are never downloaded."
                )
        encoder_path, merges_path = find_vocab_files(directory)
        return cls(encoder=read_encoder(encoder_path), merges=read_merges(merges_path), cache_size=cache_size)

    def save_pretrained(self, directory: str | os.PathLike[str]) -> tuple[Path, ...]:
        """Write encoder.json, vocab.bpe, vocab.json and merges.txt; returns their paths."""
        return write_vocab_files(directory, encoder=self._encoder, merges=self._merges)

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (50257 for GPT-2)."""
        return len(self._encoder)

    @property
    def eos_token_id(self) -> int:
        """Id of ``<|endoftext|>`` (50256 for GPT-2)."""
        return self._special_tokens[ENDOFTEXT]

    @property
    def pad_token_id(self) -> int:
        """GPT-2 has no pad token; padding uses ``<|endoftext|>``, as Hugging Face and MindFormers do."""
        return self.eos_token_id

    @property
    def max_token_bytes(self) -> int:
        """Byte length of the longest token, special ones included (128 for GPT-2).

        Each id ``encode`` returns stands for at most this many bytes of the text, so a text of more
        than ``N * max_token_bytes`` UTF-8 bytes encodes to more than N ids, and so does one of more
        than ``N * max_token_bytes`` characters (a character is at least one byte): a length check
        that can refuse a text before tokenizing it.
        """
        return self._max_token_bytes

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token text -> id."""
        return dict(self._special_tokens)

    def __repr__(self) -> str:
        return f"GPT2Tokenizer(vocab_size={self.vocab_size}, merges={len(self._merges)})"

    # -- encoding -------------------------------------------------------------------------------

    def encode(
        self,
        text: str,
        *,
        allowed_special: AbstractSet[str] | Literal["all"] = frozenset(),
        disallowed_special: Collection[str] | Literal["all"] = "all",
    ) -> list[int]:
        """Token ids of ``text``.

        Special-token text (``<|endoftext|>``) raises ValueError unless it is in ``allowed_special``
        (then it becomes its id) or left out of ``disallowed_special`` (``disallowed_special=()``
        encodes it as ordinary text).
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes one str, got {type(text).__name__}; use encode_batch() for several texts")
        allowed, disallowed = self._special_sets(allowed_special, disallowed_special)
        if not allowed and not disallowed:
            return self._bpe.encode(text)
        ids: list[int] = []
        start = 0
        for match in self._special_pattern.finditer(text):
            token = match.group()
            if token in disallowed:
                raise ValueError(
                    f"the text contains the special token {token!r} at character {match.start()}, and "
                    "special tokens in text are refused by default so that user input cannot inject them. "
                    f"Pass allowed_special={{{token!r}}} (or 'all') to encode it as id "
                    f"{self._special_tokens[token]}, or disallowed_special=() to encode it as ordinary text."
                )
            if token in allowed:
                ids += self._bpe.encode(text[start : match.start()])
                ids.append(self._special_tokens[token])
                start = match.end()
        ids += self._bpe.encode(text[start:])
        return ids

    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        allowed_special: AbstractSet[str] | Literal["all"] = frozenset(),
        disallowed_special: Collection[str] | Literal["all"] = "all",
    ) -> list[list[int]]:
        """``encode`` of each text, in order."""
        if isinstance(texts, str):
            raise TypeError("encode_batch() takes a list of str; for one text use encode(text)")
        return [
            self.encode(text, allowed_special=allowed_special, disallowed_special=disallowed_special) for text in texts
        ]

    def _special_sets(
        self,
        allowed_special: AbstractSet[str] | Literal["all"],
        disallowed_special: Collection[str] | Literal["all"],
    ) -> tuple[AbstractSet[str], AbstractSet[str]]:
        known = self._special_tokens.keys()
        if allowed_special == "all":
            allowed: AbstractSet[str] = known
        elif isinstance(allowed_special, str):
            raise ValueError(
                f"allowed_special must be a set of special tokens or 'all', got the str {allowed_special!r}; "
                f"write allowed_special={{{allowed_special!r}}}"
            )
        else:
            allowed = frozenset(allowed_special)
        if disallowed_special == "all":
            disallowed: AbstractSet[str] = known - allowed
        elif isinstance(disallowed_special, str):
            raise ValueError(
                f"disallowed_special must be a collection of special tokens, 'all' or (), "
                f"got the str {disallowed_special!r}"
            )
        else:
            disallowed = frozenset(disallowed_special)
        unknown = (allowed | disallowed) - known
        if unknown:
            raise ValueError(
                f"unknown special tokens {sorted(unknown)}; this vocabulary's special tokens are {sorted(known)}"
            )
        return allowed, disallowed

    # -- decoding -------------------------------------------------------------------------------

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (may be part of a UTF-8 character)."""
        try:
            return self._id_to_bytes[token_id]
        except (KeyError, TypeError):
            raise self._bad_id(token_id) from None

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes that ``ids`` stand for."""
        ids = list(ids)
        try:
            return b"".join(map(self._id_to_bytes.__getitem__, ids))
        except (KeyError, TypeError):
            for position, token_id in enumerate(ids):
                try:
                    self._id_to_bytes[token_id]
                except (KeyError, TypeError):
                    raise self._bad_id(token_id, position=position) from None
            raise

    def decode(self, ids: Iterable[int], *, errors: str = "replace") -> str:
        """The text of ``ids``; bytes that are not valid UTF-8 follow ``errors`` (as ``bytes.decode``)."""
        return self.decode_bytes(ids).decode("utf-8", errors)

    def decode_batch(self, batch: Iterable[Iterable[int]], *, errors: str = "replace") -> list[str]:
        """``decode`` of each id sequence, in order."""
        return [self.decode(ids, errors=errors) for ids in batch]

    def _bad_id(self, token_id: object, *, position: int | None = None) -> ValueError:
        where = "" if position is None else f" at position {position}"
        return ValueError(f"token id {token_id!r}{where} is not in this vocabulary's range [0, {self.vocab_size})")

    # -- Hugging Face / MindFormers style call ---------------------------------------------------

    def __call__(
        self,
        texts: str | Sequence[str],
        *,
        padding: bool | str = False,
        max_length: int | None = None,
        truncation: bool | str = False,
        return_tensors: str | None = None,
        padding_side: Literal["right", "left"] = "right",
        allowed_special: AbstractSet[str] | Literal["all"] = frozenset(),
        disallowed_special: Collection[str] | Literal["all"] = "all",
    ) -> dict[str, Any]:
        """Encode, truncate and pad like ``transformers``' tokenizers; returns ``input_ids`` and
        ``attention_mask`` (1 for tokens, 0 for padding; padding uses ``pad_token_id``).

        - ``padding``: ``False`` (none), ``"longest"`` / ``True`` (to the longest text), or
          ``"max_length"`` (to ``max_length``; a longer text is an error unless ``truncation=True``).
        - ``truncation=True`` keeps the first ``max_length`` ids of each text.
        - ``return_tensors``: ``None`` gives lists (for one ``str``, flat lists), ``"np"`` int32 numpy
          arrays of shape (batch, length), ``"ms"`` int32 MindSpore Tensors of that shape.
        """
        mode = _padding_mode(padding)
        truncate = _truncation_mode(truncation)
        if return_tensors not in _RETURN_TENSORS:
            raise ValueError(f"return_tensors must be one of {_RETURN_TENSORS}, got {return_tensors!r}")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if max_length is not None and (type(max_length) is not int or max_length < 1):
            raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
        if max_length is None and (truncate or mode == "max_length"):
            needs = "truncation=True" if truncate else "padding='max_length'"
            raise ValueError(f"{needs} needs max_length; pass max_length=<number of tokens>")
        if max_length is not None and not truncate and mode != "max_length":
            raise ValueError(
                f"max_length={max_length} has no effect without truncation=True or padding='max_length'; "
                "pass one of them, or drop max_length"
            )

        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        for i, text in enumerate(batch):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is a {type(text).__name__}; pass a str or a list of str")
        input_ids = self.encode_batch(batch, allowed_special=allowed_special, disallowed_special=disallowed_special)
        if truncate:
            input_ids = [ids[:max_length] for ids in input_ids]
        attention_mask = [[1] * len(ids) for ids in input_ids]

        if mode is not None:
            if mode == "max_length":
                for i, ids in enumerate(input_ids):
                    if len(ids) > max_length:
                        raise ValueError(
                            f"texts[{i}] has {len(ids)} tokens, more than max_length={max_length}; "
                            "pass truncation=True to cut it, or a larger max_length"
                        )
                length = max_length
            else:
                length = max((len(ids) for ids in input_ids), default=0)
            input_ids = [_pad(ids, length, self.pad_token_id, padding_side) for ids in input_ids]
            attention_mask = [_pad(mask, length, 0, padding_side) for mask in attention_mask]

        if return_tensors is None:
            if single:
                return {"input_ids": input_ids[0], "attention_mask": attention_mask[0]}
            return {"input_ids": input_ids, "attention_mask": attention_mask}
        lengths = sorted({len(ids) for ids in input_ids})
        if len(lengths) > 1:
            raise ValueError(
                f"return_tensors={return_tensors!r} needs rows of one length, but the texts have "
                f"{lengths[0]}..{lengths[-1]} tokens; pass padding='longest' or padding='max_length'"
            )
        # An empty batch still has the padded width: (0, max_length).
        width = max_length if mode == "max_length" else (lengths[0] if lengths else 0)
        return {
            "input_ids": _to_tensor(input_ids, width, return_tensors),
            "attention_mask": _to_tensor(attention_mask, width, return_tensors),
        }


def _padding_mode(padding: bool | str) -> str | None:
    # The type check keeps 0 and 1 from passing as False and True.
    if isinstance(padding, (bool, str)) and padding in _PADDING_MODES:
        return _PADDING_MODES[padding]
    raise ValueError(f"padding must be False, True, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")


def _truncation_mode(truncation: bool | str) -> bool:
    if isinstance(truncation, (bool, str)) and truncation in _TRUNCATION_MODES:
        return _TRUNCATION_MODES[truncation]
    raise ValueError(f"truncation must be False, True, 'longest_first' or 'do_not_truncate', got {truncation!r}")


def _pad(values: list[int], length: int, pad_value: int, side: str) -> list[int]:
    padding = [pad_value] * (length - len(values))
    return values + padding if side == "right" else padding + values


def _to_tensor(rows: list[list[int]], width: int, kind: str) -> Any:
    # numpy and MindSpore load only here, so the tokenizer imports fast and works without them.
    import numpy as np

    array = np.array(rows, dtype=np.int32).reshape(len(rows), width)
    if kind == "np":
        return array
    import mindspore

    return mindspore.Tensor(array, dtype=mindspore.int32)
