"""The spam model as plain arrays: export a fitted base pipeline, score without scikit-learn.

The shipped model (``selection.build_pipeline``) is linear after a stateless hashing step:
per block (``words``, ``chars``, ``meta``) a HashingVectorizer (unsigned counts, no norm),
tf-idf with sub-linear tf and an l2 norm, a block weight; then one LinearSVC and a Platt
sigmoid. So a message's spam probability needs, per block, only the idf and the SVM weight
of each hashed feature, plus the intercept and the sigmoid's two numbers. ``export`` writes
those into ``<model>.linear.npz`` (numeric arrays and a JSON header, read back with
``allow_pickle=False``); ``LinearScorer`` computes the same probability with numpy and
``mmh3`` (the MurmurHash3 scikit-learn's hashing uses), never importing scikit-learn or
scipy: a serving process is ~30 MiB of arrays instead of ~185 MiB of libraries and model.

Only features the model knows are stored: those with a non-zero SVM weight or an idf below
the block's largest (every feature no training document had gets the largest, smoothed
idf ``ln(n + 1) + 1``; ``export`` checks that the dropped ones all hold exactly that).

The skops file stays the audited source of truth: the compiled file is derived from it, its
sha256 sits in the model card (``compiled``), and ``model.load_model`` uses it only when the
digest matches, else loads the skops pipeline. docs/classifier.md "Compiled scorer".
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import re
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from operator import itemgetter
from pathlib import Path
from typing import IO, Any

import mmh3
import numpy as np

from relay.errors import ModelError

FORMAT = 1
SUFFIX = ".linear.npz"
# Distinct words whose character n-gram indices a scorer keeps (per process); cleared when
# full. Measured over the SpamAssassin corpus: no cache 1.30 ms of scoring per message,
# 16,384 words 1.08 ms for ~3 MiB, 65,536 words 0.98 ms for ~17 MiB.
CACHE_WORDS = 16384
# The word token patterns a compiled file may name (selection.py's and scikit-learn's
# default): a file cannot run code, and this keeps it from bringing a slow regex either.
TOKEN_PATTERNS = frozenset({r"(?u)\b\w\w+\b|[$€£!]", r"(?u)\b\w\w+\b", r"\S+"})

FloatArray = np.ndarray[Any, np.dtype[np.float64]]
IntArray = np.ndarray[Any, np.dtype[np.int64]]


def compiled_path(model_path: Path) -> Path:
    """``models/spam.skops`` -> ``models/spam.linear.npz``."""
    return model_path.with_name(model_path.stem + SUFFIX)


# -- analyzers: scikit-learn's HashingVectorizer, token for token -------------------------


@dataclass(frozen=True, slots=True)
class Analyzer:
    """How one block turns its column's string into tokens (a HashingVectorizer's settings
    that matter; ``export`` refuses any other setting)."""

    kind: str  # "word" or "char_wb"
    ngram_range: tuple[int, int]
    lowercase: bool
    token_pattern: str  # word analyzer only

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "ngram_range": list(self.ngram_range),
            "lowercase": self.lowercase,
            "token_pattern": self.token_pattern,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Analyzer:
        lo, hi = (int(n) for n in data["ngram_range"])
        kind = str(data["kind"])
        pattern = str(data["token_pattern"])
        if kind not in ("word", "char_wb") or not 1 <= lo <= hi <= 8:
            raise ValueError(f"unsupported analyzer {kind} {lo}-{hi}")
        if kind == "word" and pattern not in TOKEN_PATTERNS:
            raise ValueError(f"token pattern {pattern!r} is not one this relay knows")
        return cls(kind, (lo, hi), bool(data["lowercase"]), pattern)


def word_ngrams(tokens: list[str], ngram_range: tuple[int, int]) -> list[str]:
    """``_VectorizerMixin._word_ngrams``: the n-grams of a token list, joined by a space."""
    lo, hi = ngram_range
    if hi == 1:
        return tokens
    out = list(tokens) if lo == 1 else []
    for n in range(max(lo, 2), min(hi + 1, len(tokens) + 1)):
        # zip of n shifted views: the windows tokens[i : i + n], in order
        out.extend(map(" ".join, zip(*(tokens[i:] for i in range(n)), strict=False)))
    return out


def char_wb_ngrams(word: str, ngram_range: tuple[int, int]) -> list[str]:
    """``_VectorizerMixin._char_wb_ngrams`` of one whitespace-free word: n-grams of the word
    padded with a space each side; a word shorter than n counts once, at its smallest n."""
    lo, hi = ngram_range
    padded = " " + word + " "
    size = len(padded)
    if size > hi:  # the usual case, every n in full: one comprehension is ~20% faster
        return [padded[i : i + n] for n in range(lo, hi + 1) for i in range(size - n + 1)]
    out: list[str] = []
    for n in range(lo, hi + 1):
        out.extend(padded[i : i + n] for i in range(max(1, size - n + 1)))
        if size <= n:  # sklearn's ``offset == 0``: the whole padded word was one gram
            break
    return out


@dataclass(frozen=True, slots=True)
class WordTokens:
    r"""The tokens ``re.findall(pattern, doc)`` gives for a ``\b\w\w+\b`` token pattern,
    found faster (the word block's tokenising was a quarter of scoring a message).

    ``\b\w\w+\b`` matches exactly the maximal runs of two or more word characters: a
    run's first character is the only place inside it where ``\b`` holds, and greedy
    ``\w+`` ends where the run does, a boundary again. So ``\w{2,}`` finds the same runs
    without testing ``\b`` at every position; and in ASCII text, where ``\w`` is
    ``[A-Za-z0-9_]``, mapping every other character to a space (a symbol token to itself
    between spaces) and splitting does too. tests/test_linear_scorer.py holds both to the
    pattern on random text."""

    regex: re.Pattern[str]
    symbols: frozenset[str]  # the one-character tokens of the pattern's ``|[...]``
    ascii_table: dict[int, str]  # str.translate table for ASCII text

    @classmethod
    def of(cls, symbols: str) -> WordTokens:
        table = {c: " " for c in range(128) if not (chr(c).isalnum() or chr(c) == "_")}
        table.update({ord(s): f" {s} " for s in symbols if s.isascii()})
        alternative = f"|[{re.escape(symbols)}]" if symbols else ""
        return cls(re.compile(r"\w{2,}" + alternative), frozenset(symbols), table)

    def __call__(self, doc: str) -> list[str]:
        if not doc.isascii():
            return self.regex.findall(doc)
        parts = doc.translate(self.ascii_table).split()
        symbols = self.symbols
        return [t for t in parts if len(t) > 1 or t in symbols]


# The word token patterns TOKEN_PATTERNS allows, each with its faster tokeniser (``\S+`` is
# ``str.split``).
WORD_TOKENS = {
    r"(?u)\b\w\w+\b|[$€£!]": WordTokens.of("$€£!"),
    r"(?u)\b\w\w+\b": WordTokens.of(""),
}


# Padded word lengths whose n-grams are cut by one prebuilt itemgetter (longer words, rare,
# by the comprehension): at most ~60 getters a block's n-gram range, each holding its slices.
GETTER_SIZES = 64


@functools.lru_cache(maxsize=4 * GETTER_SIZES)
def _gram_getter(size: int, lo: int, hi: int) -> Callable[[str], tuple[str, ...]]:
    """Cuts every n-gram (``lo <= n <= hi < size``) of a ``size``-character string, in
    ``char_wb_ngrams``' order, in one C call (at least two slices: a tuple comes back)."""
    return itemgetter(*(slice(i, i + n) for n in range(lo, hi + 1) for i in range(size - n + 1)))


def word_grams(word: str, ngram_range: tuple[int, int]) -> Sequence[str]:
    """``char_wb_ngrams(word, ngram_range)``, twice as fast for the usual word: hashing a
    word the scorer has not cached yet was mostly cutting its n-grams one by one."""
    lo, hi = ngram_range
    if hi < len(word) + 2 <= GETTER_SIZES:
        return _gram_getter(len(word) + 2, lo, hi)(" " + word + " ")
    return char_wb_ngrams(word, ngram_range)


def analyze(analyzer: Analyzer, doc: str) -> list[str]:
    """All tokens of ``doc``, as scikit-learn's analyzer makes them (the reference the
    scorer's faster counting is tested against)."""
    if analyzer.lowercase:
        doc = doc.lower()
    if analyzer.kind == "word":
        tokens: list[str] = re.findall(analyzer.token_pattern, doc)
        return word_ngrams(tokens, analyzer.ngram_range)
    return [g for w in doc.split() for g in char_wb_ngrams(w, analyzer.ngram_range)]


def utf8_safe(doc: str) -> bool:
    """Whether ``doc`` encodes as UTF-8 (no lone surrogates). mmh3 encodes str itself but
    crashes on a lone surrogate, so such a document is hashed through ``str.encode``."""
    try:
        doc.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def hashed_indices(tokens: Iterable[str], count: int, n_features: int, safe: bool) -> IntArray:
    """``FeatureHasher``'s column of each token: ``abs(murmurhash3_32(utf8, seed=0)) %
    n_features`` (signed hash; abs(-2**31) % 2**k is 0 in both). ``safe``: ``utf8_safe``
    of the document, else each token is encoded first (raising as scikit-learn does)."""
    items: Iterable[str | bytes] = tokens if safe else (t.encode("utf-8") for t in tokens)
    signed = np.fromiter(map(mmh3.hash, items), np.int64, count)
    return np.abs(signed) % n_features


# -- the compiled model -------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class Block:
    """One feature block: its analyzer and, per hashed feature, idf and SVM weight x idf."""

    name: str
    column: int  # 0 text, 1 meta (the Extractor's row)
    n_features: int
    weight: float  # the ColumnTransformer's transformer weight
    sublinear_tf: bool
    analyzer: Analyzer
    # idf = idf_table[idf_code]: an idf depends only on a feature's document count, so a
    # block has a few thousand distinct values (2 bytes a feature instead of 8, -12 MiB).
    idf_table: FloatArray
    idf_code: np.ndarray[Any, np.dtype[np.uint16]]  # dense, n_features long
    coef_idf: FloatArray  # dense: SVM weight x idf


class LinearScorer:
    """Calibrated spam probability of (text, meta) rows, equal to the exported pipeline's
    ``predict_proba`` (to float rounding). One per process: it keeps a bounded cache of
    words it has already hashed into character n-grams."""

    def __init__(
        self,
        blocks: Sequence[Block],
        intercept: float,
        platt: tuple[float, float],
        spam_positive: bool,
        cache_words: int = CACHE_WORDS,
    ) -> None:
        self.blocks = tuple(blocks)
        self.intercept = intercept
        self.platt = platt
        self.spam_positive = spam_positive
        self._cache_words = cache_words
        # char_wb block -> word -> hashed indices of its n-grams (duplicates kept).
        self._char_cache: dict[str, dict[str, IntArray]] = {b.name: {} for b in self.blocks}

    # -- loading --------------------------------------------------------------------

    @classmethod
    def load(cls, path: Path, expected_sha256: str | None = None) -> LinearScorer:
        """Read a compiled file; ModelError when unreadable, malformed or (given
        ``expected_sha256``) not the file the card names."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelError(f"{path}: cannot read compiled model: {exc.strerror}") from None
        if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
            raise ModelError(f"{path}: sha256 differs from the model card's compiled entry")
        try:
            # Members are read a chunk at a time straight into the dense arrays: a stored
            # array is never held whole, so loading peaks near the loaded scorer's size
            # (the analysis child's peak RSS is paid once per relay worker, issue 17).
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                with archive.open("header.npy") as fh:
                    header = json.loads(str(np.lib.format.read_array(fh, allow_pickle=False)))
                return cls._from_archive(header, archive)
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
            raise ModelError(f"{path}: malformed compiled model: {exc}") from None

    @classmethod
    def _from_archive(cls, header: dict[str, Any], archive: zipfile.ZipFile) -> LinearScorer:
        if header.get("format") != FORMAT:
            raise ValueError(f"format {header.get('format')}, this relay reads {FORMAT}")
        blocks = [_block(spec, archive) for spec in header["blocks"]]
        a, b = (float(x) for x in header["platt"])
        numbers = [float(header["intercept"]), a, b, *(blk.weight for blk in blocks)]
        finite = all(
            np.isfinite(blk.coef_idf).all() and np.isfinite(blk.idf_table).all() for blk in blocks
        )
        if not (blocks and finite and all(math.isfinite(x) for x in numbers)):
            raise ValueError("no blocks, or a number that is not finite")
        return cls(blocks, numbers[0], (a, b), bool(header["spam_positive"]))

    # -- scoring --------------------------------------------------------------------

    def decision(self, text: str, meta: str) -> float:
        """The LinearSVC's decision value (positive: the pipeline's ``classes_[1]``)."""
        columns = (text, meta)
        lowered: dict[int, str] = {}
        total = self.intercept
        for block in self.blocks:
            doc = columns[block.column]
            if block.analyzer.lowercase:
                if block.column not in lowered:
                    lowered[block.column] = doc.lower()
                doc = lowered[block.column]
            index, counts = self.counts(block, doc)
            if not len(index):
                continue  # an empty block is a zero row: it adds nothing
            tf = np.log(counts) + 1.0 if block.sublinear_tf else counts
            x = tf * block.idf_table[block.idf_code[index]]
            norm = math.sqrt(float(np.dot(x, x)))
            total += block.weight * float(np.dot(tf, block.coef_idf[index])) / norm
        return total

    def probability(self, text: str, meta: str) -> float:
        """Calibrated spam probability: scikit-learn's ``_SigmoidCalibration``."""
        a, b = self.platt
        z = a * self.decision(text, meta) + b  # p(classes_[1]) = 1 / (1 + exp(z))
        positive = 1.0 / (1.0 + math.exp(z)) if z < 700 else 0.0
        return positive if self.spam_positive else 1.0 - positive

    def probabilities(self, rows: Iterable[tuple[str, str]]) -> FloatArray:
        return np.array([self.probability(t, m) for t, m in rows], dtype=np.float64)

    def counts(self, block: Block, doc: str) -> tuple[IntArray, FloatArray]:
        """Distinct hashed indices of ``doc`` and their counts: the non-zero entries of
        the block's HashingVectorizer row (``doc`` already lower-cased when it lowercases)."""
        n = block.n_features
        an = block.analyzer
        if an.kind == "char_wb":
            return self._char_counts(block, doc)
        if an.token_pattern == _NON_SPACE:
            words = doc.split()  # the same tokens as re.findall(r"\S+"), faster
        else:
            words = WORD_TOKENS[an.token_pattern](doc)
        tokens = word_ngrams(words, an.ngram_range)
        if not tokens:
            return _EMPTY_INDEX, _EMPTY_COUNTS
        by_token = Counter(tokens)
        index = hashed_indices(by_token, len(by_token), n, utf8_safe(doc))
        counts = np.fromiter(by_token.values(), np.int64, len(by_token))
        return _merge(index, counts, len(tokens))

    def _char_counts(self, block: Block, doc: str) -> tuple[IntArray, FloatArray]:
        # A word's n-grams depend on the word alone: count words, hash each new word once.
        split = doc.split()
        words = Counter(split)
        if not words:
            return _EMPTY_INDEX, _EMPTY_COUNTS
        cache = self._char_cache[block.name]
        missing = [w for w in words if w not in cache]
        if missing and len(cache) + len(missing) > self._cache_words:
            cache.clear()  # full: start again (this message's words are all hashed anew)
            missing = list(words)
        if missing:
            ngram_range = block.analyzer.ngram_range
            grams = [word_grams(w, ngram_range) for w in missing]
            flat = list(chain.from_iterable(grams))
            index = hashed_indices(flat, len(flat), block.n_features, utf8_safe(doc))
            start = 0
            for word, its_grams in zip(missing, grams, strict=True):
                cache[word] = index[start : start + len(its_grams)]
                start += len(its_grams)
        parts = [cache[w] for w in words]
        lengths = np.fromiter(map(len, parts), np.int64, len(parts))
        counts = np.repeat(np.fromiter(words.values(), np.int64, len(words)), lengths)
        return _merge(np.concatenate(parts), counts, len(split))


LOAD_CHUNK = 1 << 16  # stored features read at a time when loading (~1 MiB of temporaries)


def _npy_header(fh: IO[bytes]) -> tuple[int, np.dtype[Any]]:
    """Length and dtype of the 1-d array whose .npy header ``fh`` starts with."""
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, _fortran, dtype = np.lib.format.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, _fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    else:
        raise ValueError(f"npy format version {version}")
    if len(shape) != 1 or dtype.hasobject:
        raise ValueError("a stored array is not a 1-d numeric array")
    return int(shape[0]), dtype


def _chunks(archive: zipfile.ZipFile, member: str) -> Iterator[np.ndarray[Any, Any]]:
    """A stored array, ``LOAD_CHUNK`` elements at a time (read-only views of what was read)."""
    with archive.open(member + ".npy") as fh:
        count, dtype = _npy_header(fh)
        for start in range(0, count, LOAD_CHUNK):
            size = min(LOAD_CHUNK, count - start) * dtype.itemsize
            data = fh.read(size)
            if len(data) != size:
                raise ValueError(f"{member}: truncated")
            yield np.frombuffer(data, dtype=dtype)


def _length(archive: zipfile.ZipFile, member: str) -> tuple[int, np.dtype[Any]]:
    with archive.open(member + ".npy") as fh:
        return _npy_header(fh)


def _block(spec: dict[str, Any], archive: zipfile.ZipFile) -> Block:
    """One block's dense arrays, filled from its stored features a chunk at a time (the
    same numbers, element for element, as from the whole stored arrays)."""
    name, n = str(spec["name"]), int(spec["n_features"])
    members = (f"{name}.index", f"{name}.idf", f"{name}.coef")
    (count, index_type), *others = (_length(archive, m) for m in members)
    if index_type.kind not in "iu" or any(c != count for c, _ in others):
        raise ValueError(f"block {name}: inconsistent arrays")

    def stored(*which: str) -> Iterator[tuple[np.ndarray[Any, Any], ...]]:
        for parts in zip(*(_chunks(archive, m) for m in which), strict=True):
            index = parts[0]
            if len(index) and (index.min() < 0 or index.max() >= n):
                raise ValueError(f"block {name}: inconsistent arrays")
            yield (index, *(np.asarray(p, dtype=np.float64) for p in parts[1:]))

    # pass 1: SVM weight x idf, and the block's distinct idf values
    coef_idf = np.zeros(n, dtype=np.float64)
    distinct = [np.array([float(spec["default_idf"])])]
    for index, idf_values, coef_values in stored(*members):
        coef_idf[index] = coef_values * idf_values
        distinct.append(np.unique(idf_values))
    table = np.unique(np.concatenate(distinct))
    if len(table) > np.iinfo(np.uint16).max:
        raise ValueError(f"block {name}: {len(table)} distinct idf values")
    # pass 2: each feature's idf as its position in that table
    idf_code = np.full(n, np.searchsorted(table, distinct[0][0]), dtype=np.uint16)
    for index, idf_values in stored(*members[:2]):
        idf_code[index] = np.searchsorted(table, idf_values)
    return Block(
        name=name,
        column=int(spec["column"]),
        n_features=n,
        weight=float(spec["weight"]),
        sublinear_tf=bool(spec["sublinear_tf"]),
        analyzer=Analyzer.from_dict(spec["analyzer"]),
        idf_table=table,
        idf_code=idf_code,
        coef_idf=coef_idf,
    )


_NON_SPACE = r"\S+"  # the meta block's pattern: str.split() gives the same tokens
_EMPTY_INDEX: IntArray = np.zeros(0, dtype=np.int64)
_EMPTY_COUNTS: FloatArray = np.zeros(0, dtype=np.float64)


def _merge(index: IntArray, counts: IntArray, most: int) -> tuple[IntArray, FloatArray]:
    """Sum the counts of equal indices (distinct tokens may hash alike, as in sklearn):
    the arrays as they are when all indices differ, else by increasing index (what
    ``np.unique`` and ``np.bincount`` gave). ``most`` bounds every count (the number of
    tokens): below 2**31, index and count are packed into one int64 (an index is at most
    2**31: ``hashed_indices``) and sorted together, a third faster than ``np.unique``
    with its inverse; the counts are whole numbers, so their sums are exact in any order."""
    if len(index) < 2 or most >= _PACKED_COUNT:
        return _merge_any(index, counts)
    keys = np.sort(index << _PACK_SHIFT | counts)
    ordered = keys >> _PACK_SHIFT
    starts = np.flatnonzero(ordered[1:] != ordered[:-1]) + 1
    if len(starts) == len(index) - 1:
        return index, counts.astype(np.float64)
    starts = np.concatenate((_FIRST, starts))
    merged = np.add.reduceat(keys & (_PACKED_COUNT - 1), starts)
    return ordered[starts], merged.astype(np.float64)


def _merge_any(index: IntArray, counts: IntArray) -> tuple[IntArray, FloatArray]:
    """``_merge`` for counts of any size."""
    unique, inverse = np.unique(index, return_inverse=True)
    if len(unique) == len(index):
        return index, counts.astype(np.float64)
    merged = np.bincount(inverse, weights=counts, minlength=len(unique))
    return unique, np.asarray(merged, dtype=np.float64)


_PACK_SHIFT = 31
_PACKED_COUNT = 1 << _PACK_SHIFT
_FIRST: IntArray = np.zeros(1, dtype=np.int64)


# -- export -------------------------------------------------------------------------------


def _analyzer_of(name: str, vec: Any) -> Analyzer:
    """The analyzer of a HashingVectorizer; ModelError for settings the scorer lacks."""
    p = vec.get_params()
    expected = {
        "alternate_sign": False,
        "binary": False,
        "norm": None,
        "preprocessor": None,
        "tokenizer": None,
        "stop_words": None,
        "strip_accents": None,
        "input": "content",
    }
    wrong = [k for k, v in expected.items() if p.get(k) != v]
    if p.get("analyzer") not in ("word", "char_wb") or np.dtype(p.get("dtype")) != np.float64:
        wrong.append("analyzer/dtype")
    if p["analyzer"] == "word" and re.compile(p["token_pattern"]).groups > 1:
        wrong.append("token_pattern groups")  # sklearn refuses these too
    if wrong:
        raise ModelError(f"block {name}: cannot compile hashing settings {', '.join(wrong)}")
    lo, hi = p["ngram_range"]
    pattern = str(p["token_pattern"]) if p["analyzer"] == "word" else ""
    return Analyzer(str(p["analyzer"]), (int(lo), int(hi)), bool(p["lowercase"]), pattern)


def _classifier_parts(classify: Any, width: int) -> tuple[FloatArray, float, float, float, bool]:
    """(coef, intercept, platt a, platt b, spam positive) of a CalibratedClassifierCV
    (ensemble=False, sigmoid) over a binary linear model."""
    parts = getattr(classify, "calibrated_classifiers_", None)
    classes = [str(c) for c in getattr(classify, "classes_", [])]
    if parts is None or len(parts) != 1 or classes not in (["ham", "spam"], ["spam", "ham"]):
        raise ModelError("classifier: not one calibrated binary ham/spam classifier")
    part = parts[0]
    calibrators = getattr(part, "calibrators", [])
    if part.method != "sigmoid" or len(calibrators) != 1:
        raise ModelError("classifier: not a single sigmoid calibration")
    coef = np.asarray(getattr(part.estimator, "coef_", np.zeros((0, 0))), dtype=np.float64)
    intercept = np.atleast_1d(np.asarray(getattr(part.estimator, "intercept_", []), np.float64))
    if coef.shape != (1, width) or intercept.shape != (1,):
        raise ModelError(f"classifier: coef shape {coef.shape}, expected (1, {width})")
    cal = calibrators[0]
    return coef[0], float(intercept[0]), float(cal.a_), float(cal.b_), classes[1] == "spam"


def export(pipeline: Any, out: Path) -> str:
    """Write the compiled form of a fitted base pipeline; returns the file's sha256.

    ModelError when the pipeline is not of the supported shape (a composite's site model,
    another estimator, other hashing settings): such a model is served by scikit-learn."""
    steps = getattr(pipeline, "named_steps", {})
    features, classify = steps.get("features"), steps.get("classify")
    transformers = getattr(features, "transformers_", None)
    if features is None or classify is None or transformers is None:
        raise ModelError("not a features + classify pipeline")
    where = features.output_indices_
    weights = features.transformer_weights or {}
    header: dict[str, Any] = {"format": FORMAT, "blocks": []}
    arrays: dict[str, Any] = {}
    spans: list[tuple[str, slice, Any, Any]] = []
    for name, transformer, column in transformers:
        if name == "remainder":
            if transformer != "drop" or where[name].stop != where[name].start:
                raise ModelError("columns outside the blocks are passed through")
            continue
        hsteps = getattr(transformer, "named_steps", {})
        vec, tfidf = hsteps.get("hash"), hsteps.get("tfidf")
        if vec is None or tfidf is None or column not in (0, 1) or len(hsteps) != 2:
            raise ModelError(f"block {name}: not hash -> tfidf over column 0 or 1")
        tp = tfidf.get_params()
        if tp["norm"] != "l2" or not tp["use_idf"]:
            raise ModelError(f"block {name}: tf-idf without idf or l2 norm")
        header["blocks"].append(
            {
                "name": name,
                "column": int(column),
                "n_features": int(vec.n_features),
                "weight": float(weights.get(name, 1.0)),
                "sublinear_tf": bool(tp["sublinear_tf"]),
                "analyzer": _analyzer_of(name, vec).as_dict(),
            }
        )
        spans.append((name, where[name], vec, tfidf))
    width = max(s.stop for _, s, _, _ in spans)
    coef, intercept, a, b, spam_positive = _classifier_parts(classify, width)
    for spec, (name, span, vec, tfidf) in zip(header["blocks"], spans, strict=True):
        idf = np.asarray(tfidf.idf_, dtype=np.float64)
        block_coef = coef[span]
        if span.stop - span.start != vec.n_features or len(idf) != vec.n_features:
            raise ModelError(f"block {name}: width differs from its hashing")
        default = float(idf.max())
        keep = np.flatnonzero((idf != default) | (block_coef != 0))
        spec["default_idf"] = default
        spec["stored_features"] = len(keep)
        arrays[f"{name}.index"] = keep.astype(np.int32)
        arrays[f"{name}.idf"] = idf[keep]
        arrays[f"{name}.coef"] = block_coef[keep]
    header.update(intercept=intercept, platt=[a, b], spam_positive=spam_positive)
    arrays["header"] = np.array(json.dumps(header, sort_keys=True))
    data = _npz_bytes(arrays)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(out)
    return hashlib.sha256(data).hexdigest()


def _npz_bytes(arrays: dict[str, Any]) -> bytes:
    """``np.savez_compressed`` with a fixed member time, so the same model always compiles
    to the same bytes (anyone can recompile and compare digests)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, value in arrays.items():
            member = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            member.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(member, "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.asanyarray(value), allow_pickle=False)
    return buffer.getvalue()
