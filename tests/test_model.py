"""model.py and facts/classifier.py: the shipped model, refusals, the serving pool."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest
from bench.sacorpus import TARBALLS

from relay.classifier.features import FEATURE_VERSION, FeatureSettings
from relay.classifier.model import card_path, load_model
from relay.classifier.serving import Classifier
from relay.errors import FactError, ModelError
from relay.facts import default_registry
from relay.facts.base import Facts, Services
from relay.message import Message
from relay.secretkey import SecretKey

MODEL = Path(__file__).resolve().parents[1] / "models" / "spam.skops"
SHARED = Path(os.environ.get("RELAY_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
CORPUS = SHARED / "corpora" / "spamassassin"
# ../shared/anchors.md: the best peer (SpamAssassin 4.0.1, stock rules + Bayes) on this split.
ANCHOR_AUC = 0.99926
ANCHOR_RECALL_AT_0_1_PCT_FPR = 0.850

SPAM = (
    b"From: Best Deals <deals8812@cheap-meds-online.biz>\r\nTo: you@example.org\r\n"
    b"Subject: FREE VIAGRA!!! LOWEST PRICES GUARANTEED\r\nContent-Type: text/html\r\n\r\n"
    b"<html><body><p>Click here to order now and save 80%! Limited time offer, act now!"
    b'</p><a href="http://cheap-meds-online.biz/order">ORDER NOW</a>'
    b'<p>To be removed from our mailing list <a href="http://cheap-meds-online.biz/r">'
    b"click here</a></p></body></html>\r\n"
)
HAM = (
    b"From: Alice Example <alice@lists.example.org>\r\nTo: dev@lists.example.org\r\n"
    b"Subject: Re: patch for the build script\r\n\r\n"
    b"> does the new makefile work on debian?\r\n\r\nYes, I tested the patch on my laptop "
    b"yesterday and the build passes. I'll push it to the repository after lunch unless "
    b"someone objects.\r\n\r\nAlice\r\n"
)


def _copy(tmp_path: Path) -> Path:
    dst = tmp_path / "spam.skops"
    shutil.copy(MODEL, dst)
    shutil.copy(card_path(MODEL), card_path(dst))
    return dst


def _stored(data: bytes) -> Message:
    return Message.from_file_bytes(data, received_at=1_795_000_000.0)  # the model reads no time


def _edit_card(path: Path, **changes: Any) -> None:
    card = json.loads(card_path(path).read_text())
    card.update(changes)
    card_path(path).write_text(json.dumps(card))


def test_shipped_model_loads_and_matches_its_card() -> None:
    import skops.io as sio

    card = json.loads(card_path(MODEL).read_text())
    assert hashlib.sha256(MODEL.read_bytes()).hexdigest() == card["model_sha256"]
    assert sorted(sio.get_untrusted_types(file=MODEL)) == card["trusted_types"]
    model = load_model(MODEL)
    assert card["classes"] == ["ham", "spam"]
    assert model.spam_column == list(model.pipeline.classes_).index("spam")
    assert model.extractor.settings == FeatureSettings.from_dict(card["features"])
    # The SpamAssassin train split and today's mail, each with its digest and held-out figures.
    sets = {s["name"]: s for s in card["training"]["sets"]}
    assert sets["spamassassin/split.tsv"]["messages"] == 4829
    assert sets["modern-dev/labels.tsv"]["messages"] == 574
    assert all(len(s["labels_sha256"]) == 64 for s in sets.values())
    held_out = card["evaluation"]["cross_validation"]["by_set"]
    assert set(held_out) == set(sets)
    assert card["features"]["version"] == FEATURE_VERSION
    spam_p, _ = model.classify_bytes(SPAM)
    ham_p, _ = model.classify_bytes(HAM)
    assert spam_p > 0.9 > 0.1 > ham_p


def test_refuses_a_model_of_another_feature_version(tmp_path: Path) -> None:
    path = _copy(tmp_path)
    card = json.loads(card_path(path).read_text())
    _edit_card(path, features={**card["features"], "version": FEATURE_VERSION - 1})
    with pytest.raises(ModelError, match="features version"):
        load_model(path)


def test_refuses_a_changed_model_file(tmp_path: Path) -> None:
    path = _copy(tmp_path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="differs from its card"):
        load_model(path)


def test_refuses_types_not_pinned_in_the_card(tmp_path: Path) -> None:
    path = _copy(tmp_path)
    card = json.loads(card_path(path).read_text())
    dropped = card["trusted_types"][0]
    _edit_card(path, trusted_types=card["trusted_types"][1:])
    with pytest.raises(ModelError, match=f"not pinned in its card: {dropped}"):
        load_model(path)


def test_refuses_other_major_library_versions(tmp_path: Path) -> None:
    path = _copy(tmp_path)
    card = json.loads(card_path(path).read_text())
    _edit_card(path, libraries={**card["libraries"], "scikit-learn": "0.24.2"})
    with pytest.raises(ModelError, match=r"scikit-learn 0\.24\.2"):
        load_model(path)


def test_refuses_missing_model_card_or_corrupt_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="model file not found"):
        load_model(tmp_path / "absent.skops")
    path = _copy(tmp_path)
    card_path(path).unlink()
    with pytest.raises(ModelError, match="model card not found"):
        load_model(path)
    junk = tmp_path / "junk.skops"
    junk.write_bytes(b"not a zip file")
    card_path(junk).write_text(
        json.dumps({"model_sha256": hashlib.sha256(b"not a zip file").hexdigest(),
                    "trusted_types": [], "libraries": json.loads(
                        card_path(MODEL).read_text())["libraries"]})
    )  # fmt: skip
    with pytest.raises(ModelError, match="not a readable skops file"):
        load_model(junk)


async def test_classifier_pool_serves_facts_off_the_loop() -> None:
    classifier = await Classifier.open(MODEL, workers=1)
    try:
        assert (
            classifier.info.version == json.loads(card_path(MODEL).read_text())["model_sha256"][:12]
        )
        registry = default_registry()
        services = Services(classifier=classifier)
        spam = Facts(registry, _stored(SPAM), services)
        ham = Facts(registry, _stored(HAM), services)
        assert await spam.get("spam_probability") > 0.9
        assert await ham.get("spam_probability") < 0.1
        assert await ham.get("parse_degraded") is False
        # One pool round-trip feeds both public facts.
        assert [r.name for r in ham.reads()] == ["classifier", "spam_probability", "parse_degraded"]
        # Concurrent requests are batched; each still gets its own message's answer.
        mixed = [_stored(SPAM if i % 3 else HAM) for i in range(40)]
        probs = await asyncio.gather(*(classifier.predict(m) for m in mixed))
        assert [p > 0.5 for p in probs] == [bool(i % 3) for i in range(40)]
        garbage = Facts(registry, _stored(b"\x00\xff\xfe\x80 junk"), services)
        probability = await garbage.get("spam_probability")
        assert 0.0 <= probability <= 1.0
        assert await garbage.get("parse_degraded") is True
    finally:
        await classifier.close()


async def test_facts_without_a_classifier_are_errors_not_crashes() -> None:
    facts = Facts(default_registry(), _stored(HAM), Services())
    with pytest.raises(FactError, match="service classifier is not configured"):
        await facts.get("spam_probability")


async def test_classifier_refuses_an_untrusted_model_at_start(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="model file not found"):
        await Classifier.open(tmp_path / "absent.skops")
    path = _copy(tmp_path)
    card = json.loads(card_path(path).read_text())
    _edit_card(path, trusted_types=card["trusted_types"][1:])
    with pytest.raises(ModelError, match="not pinned in its card"):  # raised in the worker
        await Classifier.open(path, workers=1)


async def test_relay_refuses_to_start_without_its_model(tmp_path: Path) -> None:
    import contextlib

    from relay.assembly import open_services
    from relay.config import settings_from_mapping

    settings = settings_from_mapping(
        {
            "model": {"path": str(tmp_path / "absent.skops")},
            "auth": {"enabled": False},
            "state": {"path": str(tmp_path / "state.sqlite3")},
        }
    )
    async with contextlib.AsyncExitStack() as stack:
        with pytest.raises(ModelError, match="model file not found"):
            await open_services(settings, stack, key=SecretKey.generate())


@pytest.mark.corpus
@pytest.mark.slow
def test_shipped_model_beats_the_anchors_on_the_test_split(tmp_path: Path) -> None:
    from relay.cli.main import main

    if not all((CORPUS / name).is_file() for name in (*TARBALLS, "split.tsv")):
        pytest.skip(f"SpamAssassin corpus not found under {CORPUS} (set RELAY_SHARED)")
    for name in TARBALLS:
        with tarfile.open(CORPUS / name) as tar:
            tar.extractall(tmp_path / "sa", filter="data")
    out = tmp_path / "report.json"
    argv = ["evaluate", "--model", str(MODEL), "--corpus", str(tmp_path)]
    argv += ["--labels", str(CORPUS / "split.tsv"), "--set", "test", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert (report["ham"], report["spam"]) == (810, 407)
    assert report["roc_auc"] > ANCHOR_AUC
    assert report["recall_at_fpr"]["0.1%"] > ANCHOR_RECALL_AT_0_1_PCT_FPR
    # The card's test figures are reproducible from the shipped file.
    card = json.loads(card_path(MODEL).read_text())
    assert report["roc_auc"] == pytest.approx(card["evaluation"]["test"]["roc_auc"], abs=1e-9)


def _crafted(tmp_path: Path, func: Any, trusted: list[str] | None = None) -> Path:
    """A skops Pipeline(FunctionTransformer(func)) with a digest-correct card trusting it."""
    import skops.io as sio
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    path = tmp_path / "evil.skops"
    sio.dump(Pipeline([("x", FunctionTransformer(func=func))]), path)
    card = json.loads(card_path(MODEL).read_text())
    card["model_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    card["trusted_types"] = (
        sorted(sio.get_untrusted_types(file=path)) if trusted is None else trusted
    )
    card_path(path).write_text(json.dumps(card))
    return path


@pytest.mark.parametrize(
    ("func", "named"),
    [
        (__import__("builtins").exec, "builtins.exec"),
        (__import__("builtins").eval, "builtins.eval"),
        (__import__("os").system, "system"),
        (__import__("operator").attrgetter("__class__"), "operator.attrgetter"),
        (__import__("functools").partial(__import__("numpy").log1p), "functools.partial"),
    ],
)
def test_refuses_a_crafted_model_whose_card_trusts_a_dangerous_callable(
    tmp_path: Path, func: Any, named: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import skops.io as sio

    path = _crafted(tmp_path, func)
    assert any(named in t for t in json.loads(card_path(path).read_text())["trusted_types"])
    called: list[object] = []
    monkeypatch.setattr(sio, "load", lambda *a, **k: called.append(a))
    with pytest.raises(ModelError, match=rf"type \S*{re.escape(named)}\S* is not allowed"):
        load_model(path)
    assert called == []  # refused before skops.io.load


def test_refuses_a_card_that_widens_the_allowlist(tmp_path: Path) -> None:
    # The card alone naming a type outside the allowlist is refused, before the file is parsed.
    from relay.classifier.model import read_card

    path = _copy(tmp_path)
    card = json.loads(card_path(path).read_text())
    _edit_card(path, trusted_types=[*card["trusted_types"], "subprocess.Popen"])
    with pytest.raises(ModelError, match=r"type subprocess\.Popen is not allowed"):
        read_card(path)


def test_refuses_denied_callables_re_exported_under_allowed_prefixes(tmp_path: Path) -> None:
    from relay.classifier.model import check_allowed_types, type_refusal

    assert type_refusal("sklearn.calibration._SigmoidCalibration") is None
    assert type_refusal("numpy.log1p") is None
    for name in ("numpy.load", "numpy.lib.npyio.load", "sklearn.utils.fixes.partial",
                 "builtins.exec", "importlib.import_module", "operator.methodcaller",
                 "os.system", "subprocess.run", "evil.Thing", "sklearnx.Thing"):  # fmt: skip
        assert type_refusal(name) is not None, name
    # A name the name rules pass but whose object lives elsewhere (inspect.signature).
    assert type_refusal("sklearn.utils.validation.signature") is None
    with pytest.raises(ModelError, match=r"sklearn\.utils\.validation\.signature.*inspect"):
        check_allowed_types(tmp_path, ["sklearn.utils.validation.signature"], resolve=True)


def test_allowlist_can_be_narrowed_not_widened() -> None:
    # The shipped model's untrusted types: the calibration and its grouped folds.
    model = load_model(MODEL, allowed=["sklearn.calibration.", "sklearn.model_selection._split."])
    with pytest.raises(ModelError, match=r"PredefinedSplit is not allowed"):
        load_model(MODEL, allowed=["sklearn.calibration."])
    assert model.spam_column == list(model.pipeline.classes_).index("spam")
    with pytest.raises(ModelError, match=r"type sklearn\.calibration\._CalibratedClassifier"):
        load_model(MODEL, allowed=["numpy."])
    with pytest.raises(ModelError, match="only be narrowed"):
        load_model(MODEL, allowed=["sklearn.", "os."])
