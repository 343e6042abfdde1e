"""Model versions (relay/models/): update from feedback in a real SQLite store, gates,
the registry's CURRENT pointer, tamper refusal, and the live swap in a running relay."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiosmtplib
import numpy as np
import pytest

from relay.classifier.model import LoadedModel, load_model
from relay.classifier.serving import Classification
from relay.config import FeedbackSettings, StateSettings
from relay.contracts import FactSource
from relay.delivery.memory import MemoryTransport
from relay.errors import ModelError
from relay.facts import Services, default_registry
from relay.feedback.learn import Learner
from relay.feedback.record import FeedbackEntry
from relay.feedback.store import open_feedback
from relay.message import Envelope, Message, Peer
from relay.models.holder import ClassifierHolder
from relay.models.registry import Registry, current_model_path, registry_stats
from relay.models.update import (
    GateSettings,
    Paired,
    _gate,
    auc_drop_p,
    figures,
    recall_drop_p,
    update_model,
)
from relay.pipeline.process import Pipeline
from relay.policy.holder import DeciderHolder
from relay.secretkey import SecretKey
from relay.verdict import ACCEPT_ALL, Verdict
from tests.support.relay import make_settings, running_relay, send

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "models" / "spam.skops"
T0 = 1_790_000_000.0
# A site's own spam: words the 2002 base model has little opinion on.
SPAM = ["quarterly", "tessellate", "barnacle", "voucher", "redeem", "gleaming", "portal"]
HAM = ["agenda", "minutes", "rota", "allotment", "compost", "choir", "rehearsal", "bake"]


def mail(i: int, spam: bool, rng: random.Random) -> bytes:
    words, other = (SPAM, HAM) if spam else (HAM, SPAM)
    body = " ".join(
        rng.choice(words) if rng.random() < 0.8 else rng.choice(other) for _ in range(30)
    )
    site = f"{'s' if spam else 'h'}{rng.randrange(40)}-{'shop' if spam else 'club'}.com"
    return (
        f"From: Sender {i} <n{i}@{site}>\r\nTo: you@example.org\r\n"
        f"Subject: {rng.choice(words)} {rng.choice(words)}\r\n\r\n{body}\r\nref {i}\r\n"
    ).encode()


@pytest.fixture(scope="module")
def base() -> LoadedModel:
    return load_model(BASE)


async def _scorer_for(base: LoadedModel) -> Any:
    async def scorer(raw: bytes) -> tuple[str, float]:
        return str(base.card["model_sha256"]), base.classify_bytes(raw)[0]

    return scorer


async def fed(
    tmp: Path, base: LoadedModel, n: int, *, flip_newest: float = 0.0, seed: int = 7
) -> tuple[list[FeedbackEntry], dict[str, float]]:
    """n reports through the real Learner into a real SQLite store, base score kept; the
    newest ``flip_newest`` share is mislabelled."""
    rng = random.Random(seed)
    settings = FeedbackSettings(per_reporter_daily=n + 1, max_entries=n + 1, reporter_share=1.0)
    store = await open_feedback(
        StateSettings(path=tmp / "fb.sqlite3"), settings, SecretKey.generate()
    )
    try:
        learner = Learner(store, scorer=await _scorer_for(base))
        for i in range(n):
            spam = i % 2 == 0
            label = spam if i < n * (1 - flip_newest) else not spam
            await learner.learn(
                mail(i, spam, rng),
                action="spam" if label else "ham",
                reporter=f"r{i % 9}",
                source="cli",
                now=T0 + i * 60,
            )
        return await store.entries(), await store.scores(str(base.card["model_sha256"]))
    finally:
        await store.close()


GATE = GateSettings(reporter_share=1.0)


async def test_update_on_a_real_store_makes_a_candidate_with_its_card(
    tmp_path: Path, base: LoadedModel
) -> None:
    entries, scores = await fed(tmp_path, base, 240)
    assert len(scores) == len(entries) == 240  # every report kept its base score
    cand = update_model(base, entries, 0.2, base_scores=scores, now=T0 + 1e5, gate=GATE)
    assert cand.gate.passed, cand.gate.reasons
    registry = Registry(tmp_path / "models")
    version = registry.save(cand, now=T0 + 1e5)
    assert version.status == "candidate"
    card = json.loads(version.path.with_name("spam.card.json").read_text())
    assert card["kind"] == "composite" and card["version"] == version.name
    assert card["composite"]["base_sha256"] == base.card["model_sha256"]
    assert card["feedback"]["usable"] == {"entries": 240, "spam": 120, "ham": 120}
    assert card["feedback"]["held_out"]["entries"] == 48
    assert len(card["feedback"]["digest"]) == 64
    held = card["evaluation"]["held_out_feedback"]
    assert held["candidate"]["roc_auc"] >= held["current"]["roc_auc"] - 0.01
    assert held["candidate"]["calibration"]["bins"]
    assert set(held["candidate"]["at_policy_cuts"]) == {"0.1", "0.5", "0.7", "0.9", "0.99"}
    assert card["evaluation"]["base_test"]["run"] is False
    assert {"fpr_0.1%", "fpr_1%", "p_0.5"} <= set(card["thresholds"])
    # The saved version loads through the audited loader and serves what the candidate does.
    loaded = load_model(version.path)
    raws = [mail(10_000 + i, i % 2 == 0, random.Random(i)) for i in range(6)]
    served = [p for p, _ in loaded.classify_many(raws)]
    assert served == pytest.approx(cand.classify_many(raws))
    assert [p > 0.5 for p in served] == [True, False] * 3


async def test_gate_refuses_a_candidate_over_the_fpr_budget_and_records_why(
    tmp_path: Path, base: LoadedModel
) -> None:
    # The newest fifth is mislabelled: held-out "ham" is the site's spam.
    entries, scores = await fed(tmp_path, base, 200, flip_newest=0.2)
    cand = update_model(base, entries, 0.2, base_scores=scores, now=T0 + 1e5, gate=GATE)
    assert not cand.gate.passed
    assert any("over the budget" in r for r in cand.gate.reasons)
    registry = Registry(tmp_path / "models")
    version = registry.save(cand, now=T0 + 1e5)
    assert version.status == "refused" and "over the budget" in version.reason
    with pytest.raises(ModelError, match="refused by its gate"):
        registry.promote(version.name, now=T0 + 2e5)
    assert registry.current() is None
    assert [h["action"] for h in registry.history()] == ["refused", "promote-refused"]
    assert registry_stats(registry.root)["refused"] == 2


def _paired(spam_p: list[float], ham_p: list[float], in_force: list[float]) -> Paired:
    """Candidate scores (spam first, then ham) beside the model in force's."""
    n = len(spam_p) + len(ham_p)
    return Paired(
        np.array([True] * len(spam_p) + [False] * len(ham_p)),
        np.array(spam_p + ham_p, dtype=np.float64),
        np.array(in_force, dtype=np.float64),
        np.array([f"sender{i}" for i in range(n)]),
    )


def _gate_on(paired: Paired) -> Any:
    def fig(p: Any) -> dict[str, Any]:
        return figures(paired.spam, p, paired.groups, GATE.threshold)

    return _gate(GATE, fig(paired.candidate), fig(paired.current), None, paired)


def test_a_one_message_recall_drop_on_a_small_held_out_set_is_not_a_regression() -> None:
    # 10 held-out spam: the candidate misses one the model in force caught (0.6 -> 0.5).
    paired = _paired(
        [0.95] * 5 + [0.85] + [0.5] * 4, [0.05] * 10, [0.95] * 6 + [0.5] * 4 + [0.05] * 10
    )
    assert recall_drop_p(paired, 0.9) == (1, 0, 0.5)
    gate = _gate_on(paired)
    assert gate.passed, gate.reasons
    assert gate.checks["held-out feedback: recall"]["significant"] is False
    # Without the paired scores the old rule (any drop beyond the tolerance) refuses it.
    figs = [figures(paired.spam, p, paired.groups, 0.9) for p in (paired.candidate, paired.current)]
    assert not _gate(GATE, figs[0], figs[1], None).passed


def test_a_significant_recall_drop_is_refused_with_its_test() -> None:
    # 30 spam: the candidate loses 12 the model in force caught and gains none.
    in_force = [0.95] * 20 + [0.5] * 10 + [0.05] * 20
    paired = _paired([0.95] * 8 + [0.6] * 22, [0.05] * 20, in_force)
    lost, won, p = recall_drop_p(paired, 0.9)
    assert (lost, won) == (12, 0) and p == pytest.approx(2**-12)
    gate = _gate_on(paired)
    assert not gate.passed
    assert any("recall dropped" in r and "McNemar" in r for r in gate.reasons)


def test_recall_is_not_compared_with_a_model_in_force_over_the_fpr_budget() -> None:
    # The model in force catches 20 of 30 spam but blocks 1 of 20 ham (5 % > 1 %).
    in_force = [0.95] * 20 + [0.5] * 10 + [0.95] + [0.05] * 19
    paired = _paired([0.95] * 8 + [0.6] * 22, [0.05] * 20, in_force)
    gate = _gate_on(paired)
    assert gate.passed, gate.reasons
    assert gate.checks["held-out feedback: recall"]["compared"] is False
    # The same drop against a model in force within the budget is refused (test above).


def test_auc_drops_count_only_when_significant() -> None:
    # One spam of 10 ranked below 3 of 10 ham: AUC 1.0 -> 0.97, noise on 20 messages.
    small = _paired([0.95] * 9 + [0.3], [0.05] * 7 + [0.4] * 3, [0.95] * 10 + [0.05] * 10)
    assert auc_drop_p(small) > 0.05
    assert _gate_on(small).passed
    # Half the spam ranked below every ham on 80 messages: a real loss of ranking.
    big = _paired([0.95] * 20 + [0.01] * 20, [0.05] * 40, [0.95] * 40 + [0.05] * 40)
    assert auc_drop_p(big) < 0.05
    gate = _gate_on(big)
    assert any("roc_auc dropped" in r and "bootstrap" in r for r in gate.reasons)


def test_exact_mcnemar_p_values() -> None:
    paired = _paired([0.95, 0.95, 0.95, 0.5], [0.05], [0.5, 0.5, 0.5, 0.95, 0.05])
    assert recall_drop_p(paired, 0.9) == (1, 3, 15 / 16)  # exact: sums over 2**n
    flipped = Paired(paired.spam, paired.current, paired.candidate, paired.groups)
    assert recall_drop_p(flipped, 0.9) == (3, 1, 5 / 16)


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory: pytest.TempPathFactory, base: LoadedModel) -> Iterator[Path]:
    tmp = tmp_path_factory.mktemp("versions")
    entries, scores = asyncio.run(fed(tmp, base, 160))
    registry = Registry(tmp / "models")
    for share in (0.2, 0.25):
        cand = update_model(base, entries, share, base_scores=scores, now=T0, gate=GATE)
        registry.save(cand, now=T0)
    yield tmp / "models"


def _copy(src: Path, dst: Path) -> Registry:
    import shutil

    shutil.copytree(src, dst)
    return Registry(dst)


def test_promote_and_rollback_move_current_atomically(two_versions: Path, tmp_path: Path) -> None:
    registry = _copy(two_versions, tmp_path / "models")
    first, second = (v.name for v in registry.versions())
    settings = make_settings(tmp_path, {"model": {"registry": str(registry.root)}})
    assert current_model_path(settings) == settings.model.path
    registry.promote(first, now=T0)
    registry.promote(second, now=T0 + 1)
    assert (registry.root / "CURRENT").read_text() == second + "\n"
    assert current_model_path(settings) == registry.root / second / "spam.skops"
    assert not [p for p in registry.root.iterdir() if p.name.startswith(".")]  # no temp left
    assert registry.rollback(now=T0 + 2) == first
    assert current_model_path(settings) == registry.root / first / "spam.skops"
    assert registry.rollback(now=T0 + 3) is None
    assert current_model_path(settings) == settings.model.path
    assert [v.status for v in registry.versions()] == ["promoted", "promoted"]


@pytest.mark.parametrize("target", ["spam.skops", "base.skops"])
def test_a_tampered_version_is_refused_at_promote_and_at_load(
    two_versions: Path, tmp_path: Path, target: str
) -> None:
    registry = _copy(two_versions, tmp_path / "models")
    name = registry.versions()[0].name
    path = registry.root / name / target
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="differs from its card"):
        registry.promote(name, now=T0, force=True)
    assert registry.current() is None
    assert registry.status(name)["status"] == "refused"
    with pytest.raises(ModelError, match="differs from its card"):
        load_model(registry.model_path(name))


def test_an_untrusted_or_swapped_version_is_never_promoted(
    two_versions: Path, tmp_path: Path
) -> None:
    registry = _copy(two_versions, tmp_path / "models")
    first, second = (v.name for v in registry.versions())
    card_file = registry.root / first / "spam.card.json"
    card = json.loads(card_file.read_text())
    card["trusted_types"] = [*card["trusted_types"], "builtins.exec"]
    card_file.write_text(json.dumps(card))
    with pytest.raises(ModelError, match=r"builtins\.exec"):
        registry.promote(first, now=T0, force=True)
    # Another version's (valid) site model with this card's digest would still not pass:
    # a base file that is not the pinned one is refused.
    card = json.loads((registry.root / second / "spam.card.json").read_text())
    card["composite"]["base_sha256"] = "0" * 64
    (registry.root / second / "spam.card.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="not the one its card names"):
        registry.promote(second, now=T0, force=True)
    assert registry.current() is None


class _FakeClassifier:
    def __init__(self, p: float) -> None:
        self.p = p
        self.closed = False

    async def classify(self, message: Message) -> Classification:
        return Classification(self.p, False)

    async def close(self) -> None:
        self.closed = True


class _GatedDecider:
    """Reads spam_probability only once released: the message is in flight meanwhile."""

    name = "gated"
    fact_names = frozenset({"spam_probability"})

    def __init__(self) -> None:
        self.waiting = asyncio.Event()
        self.release = asyncio.Event()
        self.seen: dict[str, float] = {}

    async def decide(self, message: Message, facts: FactSource) -> Verdict:
        self.waiting.set()
        await self.release.wait()
        subject = message.raw.split(b"Subject: ")[1].split(b"\r\n")[0].decode()
        self.seen[subject] = float(await facts.get("spam_probability"))
        return ACCEPT_ALL


def _message(n: int) -> Message:
    raw = f"From: a@b.example\r\nSubject: m{n}\r\n\r\nbody {n}\r\n".encode()
    return Message(
        raw, Envelope("a@b.example", ("x@example.org",)), Peer("192.0.2.7"), received_at=T0
    )


async def _transaction(transport: MemoryTransport) -> Any:
    txn = await transport.begin("a@b.example")
    await txn.add_recipient("x@example.org")
    return txn


async def test_mail_in_flight_finishes_on_the_model_it_started_with() -> None:
    old, new = _FakeClassifier(0.1), _FakeClassifier(0.9)
    holder = ClassifierHolder(old, Path("old"))  # type: ignore[arg-type]
    decider = _GatedDecider()
    transport = MemoryTransport()
    pipeline = Pipeline(
        registry=default_registry(),
        services=Services(classifier=old),  # type: ignore[arg-type]
        policy=DeciderHolder(decider),
        classifiers=holder,
    )
    first = asyncio.create_task(pipeline.process(_message(1), await _transaction(transport)))
    await decider.waiting.wait()
    holder.swap(new, Path("new"))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    assert not old.closed  # still pinned by the message in flight
    decider.release.set()
    second = await pipeline.process(_message(2), await _transaction(transport))
    await first
    assert second.code == 250
    assert decider.seen == {"m1": 0.1, "m2": 0.9}  # m1 started before the swap
    await asyncio.sleep(0)
    assert _closed(old)
    assert not _closed(new)


def _closed(classifier: _FakeClassifier) -> bool:
    return classifier.closed


async def test_a_running_relay_switches_to_the_promoted_version_on_reload(
    two_versions: Path, tmp_path: Path, base: LoadedModel
) -> None:
    registry = _copy(two_versions, tmp_path / "models")
    name = registry.versions()[0].name
    # The site's spam its users reported: the learned version scores it above the base.
    # The rule's cut is read off both models, between them, so the test does not hang on
    # what the shipped base model makes of this synthetic mail.
    learned = load_model(registry.root / name / "spam.skops")
    rng = random.Random(3)
    candidates = [mail(50_000 + k, True, rng) for k in range(20)]

    def gain(raw: bytes) -> float:
        return learned.classify_bytes(raw)[0] - base.classify_bytes(raw)[0]

    site_spam = max(candidates, key=gain)
    low, high = base.classify_bytes(site_spam)[0], learned.classify_bytes(site_spam)[0]
    assert high - low > 0.1, (low, high)
    policy = tmp_path / "policy.toml"
    policy.write_text(
        '[policy]\nname = "clf"\n[policy.thresholds]\nreject = 5.0\n'
        f'[[rule]]\nname = "likely"\nwhen = "spam_probability >= {(low + high) / 2!r}"\n'
        'action = "reject"\nreason = "classifier"\n'
    )
    settings = make_settings(
        tmp_path,
        {
            "model": {"enabled": True, "path": str(BASE), "registry": str(registry.root)},
            "policy": {"path": str(policy)},
        },
    )
    async with running_relay(settings) as runtime:
        assert runtime.classifiers is not None
        before = runtime.classifiers.current
        await send(runtime.port, ["x@example.org"], site_spam)  # 250: base lets it pass
        assert not await runtime.reload_model()  # nothing promoted: nothing to switch
        # A version changed after promotion fails in the new pool; the old model serves on.
        import shutil

        shutil.copytree(registry.root / name, registry.root / "v0099-bad")
        bad = registry.root / "v0099-bad" / "spam.skops"
        bad.write_bytes(bad.read_bytes()[:-10] + b"0123456789")
        (registry.root / "CURRENT").write_text("v0099-bad\n")
        assert not await runtime.reload_model()
        assert runtime.classifiers.current is before
        registry.promote(name, now=T0)
        assert await runtime.reload_model()
        assert runtime.classifiers.current.info.version == name
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await send(runtime.port, ["x@example.org"], site_spam)
        assert refused.value.code == 550
        for _ in range(100):  # the old pool closes in the background, no pin left
            if _shut_down(before):
                break
            await asyncio.sleep(0.05)
        assert _shut_down(before)
        assert not _shut_down(runtime.classifiers.current)


def _shut_down(classifier: Any) -> bool:
    return bool(classifier.closed)


def cli_config(tmp_path: Path) -> Path:
    """relay.toml for the `relay learn` / `relay model` commands: state, key, registry."""
    key = tmp_path / "relay.key"
    key.write_bytes(SecretKey.generate().material)
    key.chmod(0o600)
    cfg = tmp_path / "relay.toml"
    cfg.write_text(
        f'[state]\npath = "{tmp_path / "state.sqlite3"}"\n'
        f'[security]\nkey_file = "{key}"\n'
        f"[feedback]\nreporter_share = 1.0\n"
        f'[model]\npath = "{BASE}"\nregistry = "{tmp_path / "models"}"\n'
    )
    return cfg


def test_the_cli_learns_updates_lists_promotes_and_rolls_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from relay.cli.main import main

    cfg = cli_config(tmp_path)
    rng = random.Random(11)
    for label in ("spam", "ham"):
        folder = tmp_path / label
        folder.mkdir()
        for i in range(60):
            (folder / f"{i}.eml").write_bytes(
                mail(i if label == "spam" else 100 + i, label == "spam", rng)
            )
        files = [str(p) for p in sorted(folder.iterdir())]
        assert main(["learn", f"--{label}", "--config", str(cfg), *files]) == 0
    capsys.readouterr()
    assert main(["model", "update", "--config", str(cfg), "--promote"]) == 0
    out = capsys.readouterr().out
    assert "candidate" in out and "promoted v0001-" in out
    assert main(["model", "list", "--json", "--config", str(cfg)]) == 0
    listing = json.loads(capsys.readouterr().out)
    [version] = listing["versions"]
    assert listing["current"] == version["name"] and version["status"] == "promoted"
    assert version["feedback"] == {"entries": 120, "spam": 60, "ham": 60}
    assert main(["model", "rollback", "--config", str(cfg)]) == 0
    assert "[model] path" in capsys.readouterr().out
    assert main(["model", "promote", version["name"], "--config", str(cfg)]) == 0
    assert main(["model", "promote", "v9999-nope", "--config", str(cfg)]) == 1


async def test_the_base_test_gate_runs_when_a_split_is_given(
    tmp_path: Path, base: LoadedModel
) -> None:
    entries, scores = await fed(tmp_path, base, 120)
    rng = random.Random(5)
    split = [(mail(20_000 + i, i % 2 == 0, rng), i % 2 == 0) for i in range(20)]
    cand = update_model(base, entries, base_scores=scores, now=T0, gate=GATE, base_test=split)
    report = cand.card["evaluation"]["base_test"]
    assert report["messages"] == 20
    assert report["candidate"]["roc_auc"] >= report["current"]["roc_auc"]
    assert "base test split: roc_auc" in cand.gate.checks
    assert cand.card["parent"] == {}
