"""The MinHash fingerprint of a body's text (the ``bulk_count`` fact, facts/bulk.py).

Here, below ``facts``, so that the classifier's children (``relay.classifier.child``,
``relay.analysis``) compute it for a relay worker and ``facts/bulk.py`` computes it in
process where there are none: one function, so both give the same keys (they are stored
state keys, shared by every worker and instance). numpy is imported inside ``fingerprint``:
a relay worker imports this module (``normalise``) but never runs it when it has children,
and numpy with OpenBLAS costs ~12 MiB of RSS a worker (issue 17).

The text is normalised (case, digit runs, URL query strings), cut into 4-word shingles and
MinHashed (12 hashes, 4 bands of 3); each band is hashed into a key.
"""

from __future__ import annotations

import functools
import hashlib
import operator
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

SHINGLE = 4
BANDS, ROWS = 4, 3
_PRIME = 4294967311  # smallest prime above 2**32: universal hashing mod p
_SEED = 20121214  # fixed: fingerprints must agree across processes

_URL_QUERY = re.compile(r"((?:https?|ftp)://[^\s?#]*)[?#]\S*", re.IGNORECASE)
_DIGITS = re.compile(r"\d+")
_TOKEN = re.compile(r"\w+", re.UNICODE)


# ASCII text's tokens by str.split: every character \w does not match becomes a space.
_ASCII_NON_WORD = {c: " " for c in range(128) if not (chr(c).isalnum() or chr(c) == "_")}


def normalise(text: str) -> list[str]:
    """Tokens of ``text`` with case, digit runs and URL query strings flattened."""
    text = text.lower()
    if "://" in text:  # the URL regex tries every position; no match without "://"
        text = _URL_QUERY.sub(r"\1", text)
    text = _DIGITS.sub("0", text)
    if text.isascii():  # \w+ runs are what is left between non-word characters
        return text.translate(_ASCII_NON_WORD).split()
    return _TOKEN.findall(text)


@functools.cache
def _coefficients() -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    """(a, b) of the 12 hash functions, drawn once per process from the fixed seed."""
    import numpy as np

    rng = np.random.default_rng(_SEED)
    a = rng.integers(1, 2**31, BANDS * ROWS, dtype=np.uint64)
    b = rng.integers(0, 2**31, BANDS * ROWS, dtype=np.uint64)
    a.setflags(write=False)
    b.setflags(write=False)
    return a, b


def _shingles(tokens: Sequence[str]) -> set[str]:
    if len(tokens) <= SHINGLE:
        return {" ".join(tokens)}
    return set(map(" ".join, zip(*(tokens[i:] for i in range(SHINGLE)), strict=False)))


_SHINGLE_HASH = functools.partial(hashlib.blake2b, digest_size=4)
_DIGEST = operator.methodcaller("digest")


def _shingle_hashes(tokens: Sequence[str]) -> bytes:
    """Each distinct shingle's 4-byte blake2b digest, concatenated (big-endian numbers):
    the loop runs in ``map`` rather than Python code (-20%; blake2b itself is the rest)."""
    return b"".join(map(_DIGEST, map(_SHINGLE_HASH, map(str.encode, _shingles(tokens)))))


def fingerprint(text: str) -> tuple[str, ...]:
    """Band keys of ``text``: near-identical texts share at least one with high probability."""
    import numpy as np

    a, b = _coefficients()
    hashes = np.frombuffer(_shingle_hashes(normalise(text)), dtype=">u4").astype(np.uint64)
    # (a * h + b) mod p for every (hash function, shingle); a, h < 2**32 so no overflow.
    mins = ((a[:, None] * hashes[None, :] + b[:, None]) % np.uint64(_PRIME)).min(axis=1)
    keys = []
    for band in range(BANDS):
        rows = mins[band * ROWS : (band + 1) * ROWS]
        keys.append(f"{band}:" + hashlib.blake2b(rows.tobytes(), digest_size=12).hexdigest())
    return tuple(keys)
