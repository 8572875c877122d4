"""A hashing word tokenizer: no vocabulary file to ship, any language in, fixed-size table."""
from __future__ import annotations

import re
import zlib

import numpy as np

WORD = re.compile(r"[\w']+", re.UNICODE)


def tokenize(text: str, vocab: int, length: int) -> np.ndarray:
    """int64 [length]; 0 is padding, words hash into 1..vocab-1 (crc32 is stable across processes)."""
    ids = [1 + zlib.crc32(w.encode()) % (vocab - 1) for w in WORD.findall(text.lower())][:length]
    out = np.zeros(length, np.int64)
    out[: len(ids)] = ids
    return out
