"""classifier/linear.py: the compiled scorer equals the scikit-learn pipeline, model.py
serves it without importing scikit-learn, and falls back when the file does not verify;
features.py's fast paths leave the features unchanged."""

from __future__ import annotations

import copy
import json
import logging
import mailbox
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
from email.parser import BytesParser
from email.policy import compat32
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from relay.classifier import features, linear, selection
from relay.classifier.model import card_path, load_model
from relay.classifier.training import compile_model, write_compiled
from relay.cli.main import main
from relay.errors import ModelError
from relay.message import undo_surrogates

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "spam.skops"
SHARED = Path(os.environ.get("RELAY_SHARED", REPO.parent / "shared"))
CORPUS = SHARED / "corpora" / "spamassassin"
# Probabilities agree to float rounding (the additions run in another order): measured
# max |difference| ~2e-16 on the SpamAssassin test split.
TOLERANCE = 1e-9

TRICKY_TEXTS = (
    "",
    " ",
    "a",
    "ab",
    "Hello, World! Cheap $$$ meds \u20ac5 \u00a33 !!!",
    "  leading   and\ttrailing \n\n spaces  ",
    "aaaa aaaa aaaa aaa aa a bb",  # repeated n-grams inside a word and across words
    # German, Japanese, emoji, dotted capital I (lower() makes 2 chars), titlecase dz, sharp s
    "Gr\u00fc\u00dfe aus M\u00fcnchen \u2014 \u65e5\u672c\u8a9e\u306e\u30c6\u30ad"
    "\u30b9\u30c8 \U0001f600 emoji \u0130stanbul \u01c5ungla \u00df stra\u00dfe",
    # accents, a ligature, fullwidth and mathematical bold letters
    "\u00c0\u00c9\u00ce\u00d5\u00dc \u00c7\u00d1 \ufb01 ligature \uff26\uff35\uff2c"
    "\uff2c \U0001d401\U0001d40e\U0001d40b\U0001d403 styled",
    "zero\u200bwidth\u00a0nbsp\u2028line\u3000ideographic",
    "under_score 123 4567 x1 1x a-b a.b https://example.org/path?q=1",
    "word " * 300 + "tail",
)
TRICKY_META = (
    "",
    "subj:cheap mailer:none urls:1 url:ip",
    "html:only html:only html:only ct:text/html",
    "Case:Sensitive case:sensitive from:tld_de",
    "url:site_b\u00fccher.de charset:unicode",
)


def _row_table(rows: list[tuple[str, str]]) -> np.ndarray[Any, Any]:
    table = np.empty((len(rows), 2), dtype=object)
    for i, (text, meta) in enumerate(rows):
        table[i, 0], table[i, 1] = text, meta
    return table


@pytest.fixture(scope="module")
def reference() -> Any:
    """The shipped model through scikit-learn (never the compiled file)."""
    return load_model(MODEL, compiled=False)


@pytest.fixture(scope="module")
def compiled() -> Any:
    model = load_model(MODEL)
    assert model.compiled is not None, "the shipped card names a verified compiled file"
    return model


# -- analyzers and hashing against scikit-learn's own -----------------------------------


def _hashing_vectorizers() -> list[tuple[str, int, Any]]:
    return [(name, column, vec) for name, vec, column in selection.vectoriser(True).transformers]


@pytest.mark.parametrize("doc", TRICKY_TEXTS + TRICKY_META)
def test_analyzers_make_sklearns_tokens(doc: str) -> None:
    scorer = load_model(MODEL).compiled
    assert scorer is not None
    for (name, _, vec), block in zip(_hashing_vectorizers(), scorer.blocks, strict=True):
        assert block.name == name
        assert linear.analyze(block.analyzer, doc) == vec.build_analyzer()(doc), name


@pytest.mark.parametrize("doc", TRICKY_TEXTS + TRICKY_META)
def test_hashed_counts_equal_the_hashing_vectorizer(compiled: Any, doc: str) -> None:
    scorer = compiled.compiled
    for (_, _, vec), block in zip(_hashing_vectorizers(), scorer.blocks, strict=True):
        row = vec.transform([doc]).tocsr()
        row.sort_indices()
        lowered = doc.lower() if block.analyzer.lowercase else doc
        for _ in range(2):  # the second time from the scorer's word cache
            index, counts = scorer.counts(block, lowered)
            order = np.argsort(index)
            assert index[order].tolist() == row.indices.tolist()
            assert counts[order].tolist() == row.data.tolist()


def test_a_full_word_cache_starts_again_and_scores_the_same(compiled: Any) -> None:
    full = compiled.compiled
    small = linear.LinearScorer(full.blocks, full.intercept, full.platt, True, cache_words=4)
    # "alpha" stays cached while the second text's new words overflow the cache
    for _ in range(2):
        for text in ("alpha beta", "alpha gamma delta epsilon zeta", *TRICKY_TEXTS):
            assert small.probability(text, "meta") == full.probability(text, "meta")


TOKEN_PIECES = [
    "a", "Zq", "_", "09", "ab", " ", "\t", "\n", "\x1c", ".", "-", "$", "!", "\u20ac", "\u00a3",
    "'", "\u00e9", "\u0130", "\u017f", "\u00a0", "\u2028", "\u200b", "\U0001d401", "\uff26",
    "\u0660", "\u00b2", "\u2163", "\u3000", "\u65e5", "\U0001f600",
]  # fmt: skip


@pytest.mark.parametrize("pattern", sorted(linear.WORD_TOKENS))
def test_word_tokens_equal_the_token_pattern(pattern: str) -> None:
    """The scorer's tokeniser (``\\w{2,}``, or translate and split in ASCII text) gives
    re.findall's tokens, in ASCII text and not, for every pattern it stands for."""
    tokens, regex = linear.WORD_TOKENS[pattern], re.compile(pattern)
    rng = random.Random(31)
    for _ in range(20000):
        doc = "".join(rng.choice(TOKEN_PIECES) for _ in range(rng.randint(0, 16)))
        assert tokens(doc) == regex.findall(doc), repr(doc)
    for doc in (*TRICKY_TEXTS, "".join(map(chr, range(128))) * 2):
        assert tokens(doc) == regex.findall(doc), repr(doc)
    assert set(linear.WORD_TOKENS) == linear.TOKEN_PATTERNS - {r"\S+"}


def test_word_grams_equal_char_wb_ngrams() -> None:
    """The scorer cuts a new word's n-grams with a prebuilt itemgetter: the very n-grams,
    in order, of the reference cut (itself checked against sklearn above), for words
    shorter than the largest n, around the getters' size limit and longer."""
    rng = random.Random(37)
    letters = "ab\u00e9\u65e5\U0001f600$!_"
    for _ in range(3000):
        word = "".join(rng.choice(letters) for _ in range(rng.randint(1, linear.GETTER_SIZES)))
        for ngram_range in ((3, 5), (1, 1), (2, 4), (1, 8), (4, 4)):
            want = linear.char_wb_ngrams(word, ngram_range)
            assert list(linear.word_grams(word, ngram_range)) == want, (word, ngram_range)


def _merge_reference(index: Any, counts: Any) -> tuple[Any, Any]:
    """What the scorer did before its packed sort: np.unique and np.bincount."""
    unique, inverse = np.unique(index, return_inverse=True)
    if len(unique) == len(index):
        return index, counts.astype(np.float64)
    return unique, np.bincount(inverse, weights=counts, minlength=len(unique))


def test_merged_counts_equal_unique_and_bincount_bit_for_bit() -> None:
    rng = np.random.default_rng(11)
    for _ in range(5000):
        size = int(rng.integers(1, 60))
        # few buckets (many collisions) to 2**31 + 1 (abs(-2**31) % n is 2**31)
        index = rng.integers(0, int(rng.choice([3, 50, 2**20, 2**31 + 1])), size)
        counts = rng.integers(1, int(rng.choice([5, 2**30])), size)
        want = _merge_reference(index, counts)
        for most in (int(counts.max()), 2**31):  # packed, and counts too large to pack
            got = linear._merge(index, counts, most)
            for g, w in zip(got, want, strict=True):
                assert g.dtype == w.dtype and g.tobytes() == w.tobytes()


def test_hash_is_sklearns_murmurhash3() -> None:
    from sklearn.utils import murmurhash3_32

    tokens = ["", "a", "hello world", "ü", "日本", "😀", "x" * 1000, "$", "€"]
    for n in (2**14, 2**20, 7):
        want = [abs(murmurhash3_32(t, seed=0, positive=False)) % n for t in tokens]
        for safe in (True, False):
            assert linear.hashed_indices(tokens, len(tokens), n, safe).tolist() == want


def test_lone_surrogates_raise_as_sklearn_does(compiled: Any, reference: Any) -> None:
    # mmh3 would crash the process on a str with a lone surrogate; sklearn raises.
    text = "caf\udce9 ordinary words"
    with pytest.raises(UnicodeEncodeError):
        reference.pipeline.predict_proba(_row_table([(text, "")]))
    with pytest.raises(UnicodeEncodeError):
        compiled.compiled.probability(text, "")


# -- the whole model against scikit-learn -------------------------------------------------


def _corpus_sample(per_tarball: int) -> list[bytes]:
    """The first messages of each SpamAssassin tarball (ham and spam, easy and hard)."""
    out: list[bytes] = []
    for name in sorted(p.name for p in CORPUS.glob("*.tar.bz2")):
        with tarfile.open(CORPUS / name) as tar:
            taken = 0
            for member in tar:
                if taken == per_tarball:
                    break
                if member.isfile() and not member.name.endswith("cmds"):
                    fh = tar.extractfile(member)
                    assert fh is not None
                    out.append(fh.read())
                    taken += 1
    return out


SYNTHETIC_MAIL = (
    b"",
    b"Subject: \r\n\r\n",
    b"From: a@b.example\r\nSubject: only headers\r\n",
    b"Subject: =?utf-8?b?w5xiZXJyYXNjaHVuZyDwn5iA?=\r\nFrom: \xc3\xa9 <x@y.de>\r\n\r\n"
    b"caf\xe9 na\xefve r\xe9sum\xe9 \xff\xfe raw 8-bit body\r\n",
    b"Subject: html only\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
    b"<html><body><a href='http://bit.ly/x'>http://paypal.com</a><img src=x>"
    b"<div style='display:none'>hidden</div><table><tr><td>\xe6\x97\xa5\xe6\x9c\xac"
    b"</td></tr></table></body></html>",
    b"Subject: huge\r\n\r\n" + b"lorem ipsum dolor sit amet consectetur " * 60000,
    b"Subject: one long word\r\n\r\n" + b"x" * 300000,
    b"Subject: zero width\r\n\r\nfr\xe2\x80\x8bee m\xe2\x80\x8boney\r\n",
)


def test_compiled_probabilities_equal_sklearns(compiled: Any, reference: Any) -> None:
    if not CORPUS.is_dir():
        pytest.skip(f"SpamAssassin corpus not found under {CORPUS} (set RELAY_SHARED); CI has it")
    raws = [*_corpus_sample(per_tarball=80), *SYNTHETIC_MAIL]
    got = compiled.classify_many(raws)
    want = reference.classify_many(raws)
    diff = max(abs(g[0] - w[0]) for g, w in zip(got, want, strict=True))
    assert diff < TOLERANCE
    assert [g[1] for g in got] == [w[1] for w in want]
    # Not a degenerate agreement: both classes present, confidently.
    probs = [g[0] for g in got]
    assert min(probs) < 0.05 and max(probs) > 0.95


def test_compiled_rows_equal_sklearns_on_tricky_rows(compiled: Any, reference: Any) -> None:
    rows = [(t, m) for t in TRICKY_TEXTS for m in TRICKY_META]
    want = reference.predict_rows(_row_table(rows))
    got = compiled.predict_rows(_row_table(rows))
    assert float(np.max(np.abs(got - want))) < TOLERANCE


# -- loading, trust and fallback ----------------------------------------------------------


def test_serving_never_imports_sklearn_or_scipy() -> None:
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from relay.classifier.model import load_model\n"
        f"m = load_model(Path({str(MODEL)!r}))\n"
        "assert m.compiled is not None\n"
        "m.classify_many([b'Subject: cheap meds\\r\\n\\r\\nbuy now!!!', b''])\n"
        "print(sorted({k.split('.')[0] for k in sys.modules}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    loaded = set(json.loads(out.stdout.replace("'", '"')))
    assert not loaded & {"sklearn", "scipy", "skops", "joblib"}


def _copy(tmp_path: Path, with_compiled: bool = True) -> Path:
    dst = tmp_path / "spam.skops"
    shutil.copy(MODEL, dst)
    shutil.copy(card_path(MODEL), card_path(dst))
    if with_compiled:
        shutil.copy(linear.compiled_path(MODEL), linear.compiled_path(dst))
    return dst


def test_a_tampered_or_missing_compiled_file_falls_back_to_sklearn(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _copy(tmp_path)
    assert load_model(path).compiled is not None
    data = bytearray(linear.compiled_path(path).read_bytes())
    data[-100] ^= 1
    linear.compiled_path(path).write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="relay.classifier"):
        model = load_model(path)
    assert model.compiled is None
    assert "sha256 differs" in caplog.text
    assert model.classify_bytes(b"Subject: hi\r\n\r\nhello")[0] > 0  # sklearn serves it
    linear.compiled_path(path).unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="relay.classifier"):
        assert load_model(path).compiled is None
    assert "cannot read compiled model" in caplog.text


def test_a_card_without_a_compiled_entry_is_served_by_sklearn(tmp_path: Path) -> None:
    path = _copy(tmp_path)
    card = json.loads(card_path(path).read_text())
    del card["compiled"]
    card_path(path).write_text(json.dumps(card))
    assert load_model(path).compiled is None


def test_the_compiled_path_still_checks_the_skops_file_and_features(tmp_path: Path) -> None:
    path = _copy(tmp_path)
    path.write_bytes(path.read_bytes() + b"x")
    with pytest.raises(ModelError, match="differs from its card"):
        load_model(path)
    (tmp_path / "v").mkdir()
    path = _copy(tmp_path / "v")
    card = json.loads(card_path(path).read_text())
    card["features"]["version"] = 1
    card_path(path).write_text(json.dumps(card))
    with pytest.raises(ModelError, match="features version"):
        load_model(path)


def test_the_pipeline_of_a_compiled_model_loads_on_demand(compiled: Any, reference: Any) -> None:
    """A composite on this base, or `relay model update`, reads the pipeline's steps."""
    rows = _row_table([("cheap meds now", "subj:cheap"), ("meeting notes", "from:own")])
    steps = compiled.pipeline.named_steps
    assert set(steps) == {"features", "classify"}
    want = reference.pipeline.predict_proba(rows)
    assert np.array_equal(compiled.pipeline.predict_proba(rows), want)


def test_relay_model_compile_rewrites_the_same_file(tmp_path: Path) -> None:
    """The shipped compiled file is exactly what the skops file compiles to."""
    path = _copy(tmp_path, with_compiled=False)
    card = json.loads(card_path(path).read_text())
    shipped = card.pop("compiled")
    card_path(path).write_text(json.dumps(card))
    assert main(["model", "compile", str(path)]) == 0
    entry = json.loads(card_path(path).read_text())["compiled"]
    assert entry["sha256"] == shipped["sha256"]
    assert linear.compiled_path(path).read_bytes() == linear.compiled_path(MODEL).read_bytes()
    assert load_model(path).compiled is not None


def test_relay_train_writes_a_verified_compiled_scorer(tmp_path: Path) -> None:
    rng = random.Random(3)
    words = {
        "ham": ["meeting", "agenda", "patch", "build", "release", "notes", "lunch", "review"],
        "spam": ["free", "winner", "casino", "cheap", "pills", "offer", "click", "claim"],
    }
    for label, vocabulary in words.items():
        box = mailbox.mbox(tmp_path / f"{label}.mbox", create=True)
        for i in range(12):
            body = " ".join(rng.choice(vocabulary) for _ in range(40))
            box.add(f"From: a{i}@{label}{i}.test\nSubject: {body[:20]}\n\n{body}\n".encode())
        box.close()
    out = tmp_path / "models"
    argv = ["train", "--ham", str(tmp_path / "ham.mbox"), "--spam", str(tmp_path / "spam.mbox")]
    assert main([*argv, "--out", str(out), "--quick"]) == 0
    card = json.loads((out / "spam.card.json").read_text())
    entry = card["compiled"]
    assert entry["file"] == "spam.linear.npz" and entry["max_abs_difference"] < TOLERANCE
    served = load_model(out / "spam.skops")
    assert served.compiled is not None
    raws = [b"Subject: free casino\r\n\r\nclaim your prize", b"Subject: agenda\r\n\r\nlunch"]
    want = load_model(out / "spam.skops", compiled=False).classify_many(raws)
    got = served.classify_many(raws)
    assert max(abs(g[0] - w[0]) for g, w in zip(got, want, strict=True)) < TOLERANCE


def test_unsupported_pipelines_are_not_compiled(tmp_path: Path, reference: Any) -> None:
    changed = copy.deepcopy(reference.pipeline)
    words = changed.named_steps["features"].transformers_[0][1]
    words.named_steps["hash"].set_params(alternate_sign=True)
    out = tmp_path / "x.linear.npz"
    with pytest.raises(ModelError, match="cannot compile hashing settings alternate_sign"):
        linear.export(changed, out)
    assert not out.exists()
    assert write_compiled(object(), tmp_path / "x.skops", log=lambda _: None) is None
    with pytest.raises(ModelError):
        compile_model(tmp_path / "missing.skops")


def test_a_malformed_compiled_file_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.linear.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="malformed compiled model"):
        linear.LinearScorer.load(bad)
    np.savez(bad.with_suffix(""), header=np.array(json.dumps({"format": 99})))
    with pytest.raises(ModelError, match="format 99"):
        linear.LinearScorer.load(tmp_path / "bad.linear.npz")


def _crafted(tmp_path: Path, change: Any) -> Path:
    """The shipped compiled file with its header changed by ``change``."""
    with np.load(linear.compiled_path(MODEL), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    header = json.loads(str(arrays["header"]))
    change(header)
    arrays["header"] = np.array(json.dumps(header))
    out = tmp_path / "crafted.linear.npz"
    out.write_bytes(linear._npz_bytes(arrays))
    return out


def test_a_crafted_compiled_file_cannot_bring_a_regex_or_non_finite_numbers(
    tmp_path: Path,
) -> None:
    def slow_regex(header: dict[str, Any]) -> None:
        header["blocks"][0]["analyzer"]["token_pattern"] = r"(a+)+$"

    def nan_weight(header: dict[str, Any]) -> None:
        header["blocks"][2]["weight"] = float("nan")

    with pytest.raises(ModelError, match="not one this relay knows"):
        linear.LinearScorer.load(_crafted(tmp_path, slow_regex))
    with pytest.raises(ModelError, match="not finite"):
        linear.LinearScorer.load(_crafted(tmp_path, nan_weight))
    assert linear.LinearScorer.load(_crafted(tmp_path, lambda h: None)).blocks


# -- features.py's fast paths ----------------------------------------------------------


def test_artefact_hints_cover_every_case_insensitive_match() -> None:
    """_clean skips the artefact regex when str.lower() finds no hint: every character the
    regex's IGNORECASE matches to a hint letter must lower() to it or be listed."""
    letters = sorted({ch for hint in features._ARTEFACT_HINTS for ch in hint if ch.isalpha()})
    any_letter = re.compile("[" + "".join(letters) + "]", re.IGNORECASE)
    odd = [
        chr(c)
        for c in range(128, sys.maxunicode + 1)
        if not 0xD800 <= c <= 0xDFFF
        and any_letter.fullmatch(chr(c))
        and chr(c).lower() not in letters
    ]
    assert sorted(odd) == sorted(features._FOLDS_TO_HINT)


def test_url_hints_cover_every_case_insensitive_match() -> None:
    """_urls skips the URL regex when str.lower() finds neither "http" nor "www.": every
    character the regex's IGNORECASE matches to h, t, p or w must lower() to it."""
    any_letter = re.compile("[htpw]", re.IGNORECASE)
    odd = [
        chr(c)
        for c in range(128, sys.maxunicode + 1)
        if not 0xD800 <= c <= 0xDFFF and any_letter.fullmatch(chr(c))
    ]
    assert odd == []


def test_urls_equal_the_url_regex_on_random_mixtures() -> None:
    rng = random.Random(29)
    pieces = [
        "http", "HTTPS", "hTtP", "://", "www", "WWW", ".", " ", "\n", "a", "x.com", "/p?q=1",
        "<", '"', "(", "\u017f", "\u0130", "\u00e9", "ftp://", "wwww.", "h\u200bttp",
    ]  # fmt: skip
    for _ in range(20000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        assert features._urls(text) == features._URL.findall(text), repr(text)


def test_header_fields_are_the_values_get_all_gives() -> None:
    """The extractor reads every header through one index: the same values, in order, as
    ``get_all`` for any case of the name, raw 8-bit and repeated fields included."""
    raw = (
        b"Subject: one\r\nsubject: two\r\nFROM: =?utf-8?q?J=C3=B6rg?= <j@x.test>\r\n"
        b"X-Mailer: caf\xe9 mailer\r\nList-Id: <l.x.test>\r\nTo: a@b.test,\r\n c@d.test\r\n"
        b"subJECT: three\r\n\r\nbody\r\n"
    )
    msg = BytesParser(policy=compat32).parsebytes(raw)
    fields = features._fields(msg)
    for name in ("subject", "from", "x-mailer", "list-id", "to", "cc", "feedback-id"):
        assert fields.get(name, []) == (msg.get_all(name) or []), name
    assert [str(v) for v in fields["subject"]] == ["one", "two", "three"]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "plain text without anything",
        "see spamassassin.TAINT.ORG today",
        "ta\u0130nt.org and jma\u017fon.org",
        "mail zzzz@x.y or Foo@EXAMPLE.com, bar@sub.jmason.org.",
        "caf\udce9 and taint.org",
        "caf\udce9 only",
        "\ud800 lone high surrogate",
        "baddomain.com.evil",
        "x" * 3000,  # a long run: cleaned run by run
        "xxxx" + "a" * 3000 + "@example.com and zzzz.q@w",
        "word " * 10 + "a.b" * 1000 + "@sub.example.com tail taint.org " + "c" * 300,
        "ta\u0130nt.org" + "c" * 400 + " \u017f " + "d@jmason.org",
    ],
)
def test_clean_equals_the_plain_regex(text: str) -> None:
    assert features._clean(text) == features._ARTEFACT.sub(" ", undo_surrogates(text))


def test_clean_equals_the_plain_regex_on_random_mixtures() -> None:
    rng = random.Random(17)
    pieces = [
        "taint.org", "TAINT.ORG", "baddomain.com", "@", "@", "xxxx", "zzzz", "example.com",
        "jmason.org", " ", " ", "\t", "\n", "a", "b.", "-", "+", "\u0130", "\u017f", "\u00e9",
        "x" * 300, "q." * 150, "w" * 5,
    ]  # fmt: skip
    for _ in range(400):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
        assert features._clean(text) == features._ARTEFACT.sub(" ", text), repr(text)


ADDRESS_PIECES = [
    "@", "@", "a", "Z", "zzzz", "XXXX", "yyyy", ".", "-", "+", "example.com", "EXAMPLE.COM",
    "jmason.org", "sub.", "b-", "!", "\u00e9", "_", "9", "com", "org", "\u0130", "\u017f",
]  # fmt: skip


def test_address_cleaning_equals_the_regex_on_random_runs() -> None:
    rng = random.Random(23)
    for _ in range(20000):
        run = "".join(rng.choice(ADDRESS_PIECES) for _ in range(rng.randint(0, 12)))
        assert features._clean_addresses(run) == features._ARTEFACT_ADDRESS.sub(" ", run), run


@pytest.mark.parametrize(
    "run",
    [
        # The shapes that made the regex quadratic (5 s at 32 KiB), at a size it can still
        # check: a long local part, a long host before the hint, a chain of @s.
        "a" * 2000 + "@" + "b-" * 2000 + "example.com",
        "x@" + "a." * 2000 + "jmason.orgz",
        "zzz@a." * 400 + "example.com",
        "q" * 1000 + "@" + "a." * 1000 + "example.com.x@example.com",
        "a@" * 2000 + "example.com",
        "zzzz" + "a.b" * 1000 + "@x",
    ],
)
def test_address_cleaning_equals_the_regex_on_long_runs(run: str) -> None:
    assert features._clean_addresses(run) == features._ARTEFACT_ADDRESS.sub(" ", run)


def test_display_names_are_scanned_for_domains_up_to_a_header_lines_length() -> None:
    """_DOMAIN_LIKE is quadratic in a chain of dots; a name is read up to 998 characters
    (the longest in the training corpora: 236), so a huge name costs milliseconds."""

    def meta(name: str) -> str:
        raw = f'From: "{name}" <x@sender.test>\r\nTo: a@b.test\r\nSubject: s\r\n\r\nhi\r\n'
        return features.Extractor().extract_bytes(raw.encode()).meta

    assert "from:name_other_domain" in meta("PayPal.com Support")
    padded = "a." * 600  # 1200 characters of chain before the domain
    assert "from:name_other_domain" in meta("paypal.com " + padded)
    assert "from:name_other_domain" not in meta(padded + " paypal.com")
    assert "from:name_other_domain" not in meta("a." * 32000)  # and it returns at once
