"""GPT-2's byte-level BPE tokenizer: strings and bytes in, token ids out, and back.

- ``GPT2Tokenizer``: loading, encode/decode, batches, padding (``gpt2_tokenizer.py``);
- ``IncrementalDecoder``: streaming decode that never splits a UTF-8 character (``streaming.py``);
- ``bpe.py``: the byte table, the pre-tokenisation pattern, the merge loop and its bounded cache;
- ``vocab_files.py``: encoder.json / vocab.bpe (and vocab.json / merges.txt) reading and writing.

Knows nothing about models, MindSpore (except turning ids into Tensors on request) or HTTP.
"""

from tokenizer.gpt2_tokenizer import ENDOFTEXT, GPT2Tokenizer
from tokenizer.streaming import IncrementalDecoder

__all__ = ["ENDOFTEXT", "GPT2Tokenizer", "IncrementalDecoder"]
