"""`relay lab tune` (src/relay/lab/tune.py): scores and thresholds fitted under a
false-positive budget by cross-validation.

Synthetic hit matrices whose optimum is known test the fit; the policy rewrite is checked
byte for byte; the command runs end to end on the lab's fixture corpus
(tests/fixtures/lab) with labels files written here, because the fixture's own labels put
all but one message in set "test", which tuning must never read.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from relay.cli.main import main
from relay.errors import RelayError
from relay.facts import default_registry
from relay.lab import tune
from relay.lab.cache import Cached
from relay.lab.rescore import RuleDef
from relay.policy import compile_policy

FIXTURES = Path(__file__).parent / "fixtures" / "lab"
CORPUS = FIXTURES / "corpus"
ROOT = Path(__file__).resolve().parents[1]


def _problem(
    rows: list[tuple[bool, set[str], int]],
    rules: tuple[RuleDef, ...],
    thresholds: dict[str, float],
    unevaluable: tuple[int, ...] = (),
) -> tune.Problem:
    """rows: (is spam, rules matched, how many such messages)."""
    names = [r.name for r in rules]
    hits: list[list[bool]] = []
    spam: list[bool] = []
    for is_spam, matched, count in rows:
        for _ in range(count):
            hits.append([n in matched for n in names])
            spam.append(is_spam)
    return tune.Problem(
        rules=rules,
        hits=np.array(hits, dtype=np.bool_),
        spam=np.array(spam, dtype=np.bool_),
        thresholds=thresholds,
        unevaluable=unevaluable,
    )


# Known optimum: S fires on 80% of spam and no ham (it alone must block); H fires on as
# much ham as spam (worthless: pushed below its 4 points and never blocking alone); E is
# an exemption (-1) that fires on ham, and must stay <= 0; F forces a reject; N never
# fires; D is a rule whose fact failed on every message (DNS offline).
RULES = (
    RuleDef("S", 1.0),
    RuleDef("H", 4.0),
    RuleDef("E", -1.0),
    RuleDef("F", action="reject"),
    RuleDef("N", 2.0),
    RuleDef("D", 3.0),
)
THRESHOLDS = {"tag": 2.0, "quarantine": 3.0, "reject": 6.0}
ROWS = [
    (True, {"S"}, 60),
    (True, {"S", "H"}, 20),
    (True, {"H"}, 10),
    (True, set(), 5),
    (True, {"F"}, 5),
    (False, {"H"}, 30),
    (False, {"H", "E"}, 30),
    (False, {"E"}, 40),
    (False, set(), 300),
]


def _known() -> tune.Problem:
    return _problem(ROWS, RULES, THRESHOLDS, unevaluable=(0, 0, 0, 0, 0, 400 + 100))


@pytest.mark.parametrize("method", ["logistic", "perceptron"])
def test_known_optimum_separating_rule_blocks_and_ham_rule_is_pushed_down(method: str) -> None:
    result = tune.tune(_known(), budget=0.0, folds=5, seed=1, methods=(method,))
    new = {r.name: r for r in result.rules}
    cutoff = result.final.cutoff
    assert new["S"].kept is None and new["S"].new >= cutoff  # alone, it blocks
    assert new["H"].kept is None and new["H"].new < 4.0 and new["H"].new < cutoff
    assert new["E"].new <= 0.0  # the exemption keeps its sign
    assert new["F"].action == "reject" and new["F"].new == 0.0 and new["F"].kept
    assert new["N"].new == 2.0 and new["N"].kept is not None and "no evidence" in new["N"].kept
    assert new["D"].new == 3.0 and new["D"].kept is not None and "not evaluable" in new["D"].kept
    # Out of fold: every S spam and the forced spam stopped, no legitimate mail blocked.
    (evaluation,) = result.evaluations
    spam = result.problem.spam
    assert int((evaluation.blocked & ~spam).sum()) == 0
    assert int((evaluation.blocked & spam).sum()) >= 80 + 5
    # The original scores block the 60 ham matching H (4 >= quarantine 3).
    assert int((result.original & ~spam).sum()) == 60


def test_thresholds_move_as_a_ladder_and_stay_valid() -> None:
    result = tune.tune(_known(), budget=0.0, folds=5, seed=1)
    new = result.thresholds
    assert new["quarantine"] == result.final.cutoff
    assert new["reject"] - new["quarantine"] == pytest.approx(3.0)
    assert new["quarantine"] - new["tag"] == pytest.approx(1.0)


def _noisy(seed: int) -> tune.Problem:
    """Four overlapping rules, 1500 ham and 500 spam drawn at random: nothing separates."""
    rng = np.random.default_rng(seed)
    rates_spam = np.array([0.6, 0.5, 0.3, 0.05])
    rates_ham = np.array([0.05, 0.2, 0.3, 0.2])
    spam = np.array([True] * 500 + [False] * 1500)
    p = np.where(spam[:, None], rates_spam[None, :], rates_ham[None, :])
    hits = rng.random(p.shape) < p
    rules = (RuleDef("a", 3.0), RuleDef("b", 2.0), RuleDef("c", 1.0), RuleDef("d", -1.0))
    return tune.Problem(rules, hits, spam, {"tag": 2.0, "quarantine": 4.0, "reject": 8.0})


@pytest.mark.parametrize("seed", [3, 4])
def test_budget_is_respected_out_of_fold(seed: int) -> None:
    problem = _noisy(seed)
    budget = 0.01
    result = tune.tune(problem, budget=budget, folds=5, seed=seed)
    ham = ~problem.spam
    # The original policy is far over the budget (a + b = 5 reaches quarantine 4 on many
    # ham), so the tuning has work to do.
    assert int((result.original & ham).sum()) / int(ham.sum()) > budget
    for evaluation in result.evaluations:
        share = int((evaluation.blocked & ham).sum()) / int(ham.sum())
        assert share <= budget, evaluation.method
        assert int((evaluation.blocked & problem.spam).sum()) > 0
    data = tune.report_data(result, {})
    assert data["tuned"]["out_of_fold"]["ham_blocked"]["rate"] <= budget
    assert {m["method"] for m in data["methods"]} == {"logistic", "perceptron", "thresholds_only"}
    assert data["chosen"] in {"logistic", "perceptron", "thresholds_only"}


def test_choice_is_by_out_of_fold_spam_stopped_within_the_budget() -> None:
    spam = np.array([True, True, True, False])
    a = tune.Evaluation("perceptron", np.array([True, True, False, False]), 1, ())
    b = tune.Evaluation("logistic", np.array([True, False, False, False]), 1, ())
    c = tune.Evaluation("thresholds_only", np.array([True, True, False, True]), 1, ())
    assert tune.pick([a, b], spam, 0.0) == "perceptron"
    assert tune.pick([a, c], spam, 1.0) == "perceptron"  # same spam, less ham blocked
    # More spam but over the budget out of fold loses to less spam within it.
    d = tune.Evaluation("perceptron", np.array([True, True, True, True]), 0, ())
    assert tune.pick([d, b], spam, 0.0) == "logistic"
    two_ham = np.array([True, True, False, False])
    x = tune.Evaluation("logistic", np.array([True, True, True, True]), 0, ())
    y = tune.Evaluation("perceptron", np.array([True, False, True, False]), 0, ())
    assert tune.pick([x, y], two_ham, 0.0) == "perceptron"  # none within: least ham


def test_cutoff_sits_just_below_the_lowest_blocked_score_and_meets_the_allowance() -> None:
    scores = np.array([5.0, 5.0, 3.0, 3.0, 1.0, 0.0])
    spam = np.array([True, True, True, False, False, False])
    assert tune.choose_cutoff(scores, spam, 0) == 4.5  # the margin below 5, not halfway
    assert tune.choose_cutoff(scores, spam, 1) == 2.5
    assert tune.choose_cutoff(np.array([2.0, 2.0]), np.array([True, False]), 0) == 3.0
    # Closer than twice the margin: halfway, so rounding never moves a message across.
    assert tune.choose_cutoff(np.array([5.0, 4.6]), np.array([True, False]), 0) == 4.8


def test_separated_scores_do_not_block_the_unseen_gap() -> None:
    """The default policy on the classifier's own training rows: spam scores 17 and 11,
    ham -1. Halfway (5) would block every unseen message scoring 5 to 11 (a ham the
    classifier calls "possibly spam" on the test split, say); the cutoff stays by 11."""
    scores = np.array([17.0] * 5 + [11.0] * 2 + [-1.0] * 10)
    spam = np.array([True] * 7 + [False] * 10)
    assert tune.choose_cutoff(scores, spam, 0) == 10.5


def test_in_sample_model_is_recognised_by_its_card(tmp_path: Path) -> None:
    from relay.config import ModelSettings, Settings
    from relay.lab.env import LabEnv

    labels = tmp_path / "split.tsv"
    labels.write_text("a\tham\ttrain\n")
    other = tmp_path / "other.tsv"
    other.write_text("b\tspam\ttrain\n")
    model = tmp_path / "spam.skops"
    digest = hashlib.sha256(labels.read_bytes()).hexdigest()
    card = {"training": {"sets": [{"labels_sha256": digest}]}}
    (tmp_path / "spam.card.json").write_text(json.dumps(card))
    env = LabEnv(settings=Settings(model=ModelSettings(path=model)))
    assert tune.in_sample_model(env, labels)
    assert not tune.in_sample_model(env, other)
    (tmp_path / "spam.card.json").write_text("not json")
    assert not tune.in_sample_model(env, labels)


def test_budget_parsing() -> None:
    assert tune.parse_budget("0.1%") == pytest.approx(0.001)
    assert tune.parse_budget("0.004") == pytest.approx(0.004)
    for bad in ("abc", "100%", "-1%"):
        with pytest.raises(RelayError):
            tune.parse_budget(bad)


NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def test_rewrite_changes_only_the_numbers() -> None:
    path = ROOT / "config" / "regimes" / "can_spam.toml"
    text = path.read_text()
    scores = {"commercial_no_postal_address": 1.25, "ad_label_waived": -0.5, "generic_ptr": 1.0}
    out = tune.rewrite_policy(text, scores, {"tag": 3.5, "quarantine": 6.5, "reject": 9.5})
    old_lines, new_lines = text.splitlines(keepends=True), out.splitlines(keepends=True)
    assert len(old_lines) == len(new_lines)
    changed = [(a, b) for a, b in zip(old_lines, new_lines, strict=True) if a != b]
    # generic_ptr keeps its value: that line must not even be respelt.
    assert len(changed) == 5
    for a, b in changed:
        assert NUMBER.sub("#", a) == NUMBER.sub("#", b)  # byte for byte but the number
        assert a.split("=")[0] in {"score ", "tag ", "quarantine ", "reject "}
    policy = compile_policy(out, default_registry(), "tuned")
    by_name = {r.name: r for r in policy.rules}
    assert by_name["commercial_no_postal_address"].score == 1.25
    assert by_name["ad_label_waived"].score == -0.5
    assert policy.thresholds.quarantine == 6.5
    assert [r.name for r in policy.rules] == [
        r.name for r in compile_policy(text, default_registry(), "old").rules
    ]


def test_refuse_test_split() -> None:
    with pytest.raises(RelayError, match="never on a test split"):
        tune.refuse_set("test")
    tune.refuse_set(None)
    tune.refuse_set("train")


POLICY = """# Fixture policy for relay lab tune: comments and layout must survive.
[policy]
name = "fixture_tune"
mode = "enforce"

[policy.thresholds]
tag = 1.0        # headers only
quarantine = 2.0 # kept out of the inbox
reject = 5.0

# forced: never touched
[[rule]]
name = "dmarc_fail"
when = 'dmarc == "fail"'
action = "reject"
reason = "DMARC fail"

[[rule]]
name = "unauthenticated"
when = 'spf != "pass" && dkim_result != "pass"'
score = 1.0

[[rule]]
name = "big"
when = "message_size > 700"
score = 3    # an integer as written
"""


def _setup(tmp_path: Path, rows: list[str]) -> tuple[Path, Path, Path]:
    policy = tmp_path / "fixture_tune.toml"
    policy.write_text(POLICY)
    labels = tmp_path / "labels.tsv"
    labels.write_text("relative_path\tlabel\tset\n" + "".join(r + "\n" for r in rows))
    config = tmp_path / "relay.toml"
    config.write_text('[model]\nenabled = false\n[auth]\nauthserv_id = "mx.lab.example"\n')
    return policy, labels, config


def _tune_args(policy: Path, labels: Path, config: Path, tmp_path: Path) -> list[str]:
    return [
        "lab", "tune", str(policy), "--corpus", str(CORPUS), "--labels", str(labels),
        "--config", str(config), "--cache", str(tmp_path / "cache"), "--jobs", "1",
        "--no-progress", "--folds", "2", "--fp-budget", "0.1%", "--out", str(tmp_path / "out"),
    ]  # fmt: skip


# The fixture corpus split: a test row of each label, never tuned on.
FIXTURE_ROWS = [
    "ham/personal.eml\tham\ttrain",
    "ham/list-post.eml\tham\ttrain",
    "ham/authenticated.eml\tham\ttrain",
    "ham/forged-upstream.eml\tham\ttest",
    "spam/no-date.eml\tspam\ttrain",
    "spam/mortgage.eml\tspam\ttrain",
    "spam/spoof.eml\tspam\ttest",
]


def test_end_to_end_on_the_fixture_corpus(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy, labels, config = _setup(tmp_path, FIXTURE_ROWS)
    assert main([*_tune_args(policy, labels, config, tmp_path), "--heldout"]) == 0
    out = tmp_path / "out"
    assert "fixture_tune: 5 train messages" in capsys.readouterr().out
    data = json.loads((out / "tune.json").read_text())
    assert data["corpus"]["used"] == 5 and data["corpus"]["set"] == "train"
    assert data["corpus"]["sets_in_labels"] == {"test": 2, "train": 5}
    assert "left out: 2 rows of set `test`" in data["corpus"]["note"]
    assert data["heldout"]["messages"] == 2  # reported after the fit, never used
    assert data["tuned"]["out_of_fold"]["ham_blocked"]["k"] == 0  # 0.1% of 3 ham: none
    assert {r["name"]: r["kept"] for r in data["rules"]}["dmarc_fail"].startswith("forced")
    assert data["policy"]["check_ok"]
    md = (out / "tune.md").read_text()
    assert "## Methods (same folds)" in md and "perceptron" in md and "Held-out" in md
    tuned = out / "fixture_tune.tuned.toml"
    assert main(["policy", "check", str(tuned)]) == 0
    new_text = tuned.read_text()
    for old, new in zip(POLICY.splitlines(), new_text.splitlines(), strict=True):
        assert NUMBER.sub("#", old) == NUMBER.sub("#", new)
    assert "# forced: never touched" in new_text and 'action = "reject"' in new_text


def test_end_to_end_uses_train_rows_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The fixture's own labels: one train row (a ham), everything else in set test. With
    # test rows used there would be spam to fit on; with train only there is none.
    policy, _, config = _setup(tmp_path, [])
    args = _tune_args(policy, FIXTURES / "labels.tsv", config, tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "0 spam, 1 ham" in err and "only set 'train' is used" in err
    assert main([*args, "--set", "test"]) == 2
    assert "never on a test split" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# -- preset probabilities (out-of-fold spam_probability for the train rows) -----------------

PRESET_POLICY = """[policy]
name = "fixture_preset"
mode = "enforce"

[policy.thresholds]
quarantine = 5.0

[[rule]]
name = "classifier_spam"
when = "spam_probability >= 0.9"
score = 6
"""


def _message(id_: str, digest: str) -> Any:
    return SimpleNamespace(id=id_, digest=digest)


def test_apply_presets_overrides_listed_messages_only_and_copies() -> None:
    live = {
        "d1": {"spam_probability": Cached(0.5), "dkim": Cached("pass")},
        "d2": {"spam_probability": Cached(0.6)},
        "d3": {"spam_probability": Cached(None, "classifier unavailable")},
    }
    messages = [_message("a", "d1"), _message("b", "d2"), _message("c", "d3")]
    out, applied = tune.apply_presets(messages, live, {"a": 0.97, "c": 0.01, "elsewhere": 0.4})
    assert applied == 2
    assert out["d1"] == {"spam_probability": Cached(0.97), "dkim": Cached("pass")}
    assert out["d2"]["spam_probability"] == Cached(0.6)  # not listed: the live value
    assert out["d3"]["spam_probability"] == Cached(0.01)  # a live error replaced too
    # What the cache returned (and stored) is untouched.
    assert live["d1"]["spam_probability"] == Cached(0.5)
    assert live["d3"]["spam_probability"].error == "classifier unavailable"
    with pytest.raises(RelayError, match="different probability"):
        tune.apply_presets([_message("a", "d1"), _message("b", "d1")], live, {"a": 0.9, "b": 0.1})


def test_read_presets(tmp_path: Path) -> None:
    good = tmp_path / "oof.tsv"
    good.write_text("relative_path\tspam_probability\n# c\na/1\t0.25\nb/2\t1\n")
    assert tune.read_presets(good) == {"a/1": 0.25, "b/2": 1.0}
    for text, message in (
        ("a/1\t1.5\n", "not in"),
        ("a/1\n", "path<TAB>probability"),
        ("a/1\t0.1\na/1\t0.2\n", "listed twice"),
    ):
        good.write_text(text)
        with pytest.raises(RelayError, match=message):
            tune.read_presets(good)


def _preset_run(tmp_path: Path, presets: Path | None) -> dict[str, Any]:
    policy = tmp_path / "fixture_preset.toml"
    policy.write_text(PRESET_POLICY)
    _, labels, config = _setup(tmp_path, FIXTURE_ROWS)
    args = [*_tune_args(policy, labels, config, tmp_path), "--heldout"]
    if presets is not None:
        args += ["--preset-probabilities", str(presets)]
    assert main(args) == 0
    data: dict[str, Any] = json.loads((tmp_path / "out" / "tune.json").read_text())
    return data


def test_preset_probabilities_override_listed_train_rows_and_stay_out_of_the_cache(
    tmp_path: Path,
) -> None:
    # The model is disabled: live, spam_probability fails and the rule never matches. Only
    # the preset spam (no-date) can match it; mortgage is not listed and keeps the live value.
    presets = tmp_path / "oof.tsv"
    presets.write_text(
        "relative_path\tspam_probability\n"
        "spam/no-date.eml\t0.95\nham/personal.eml\t0.02\nham/list-post.eml\t0.03\n"
    )
    data = _preset_run(tmp_path, presets)
    assert data["presets"]["applied"] == 3 and data["presets"]["live"] == 2
    rule = {r["name"]: r for r in data["rules"]}["classifier_spam"]
    assert (rule["spam"], rule["ham"]) == (1, 0)
    assert data["original"]["figures"]["spam_stopped"]["k"] == 1
    # The held-out split runs on the live classifier: nothing matches there.
    assert data["heldout"]["original"]["spam_stopped"]["k"] == 0
    assert any("preset from" in n for n in data["notes"])
    assert "preset from" in (tmp_path / "out" / "tune.md").read_text()
    # The cache holds the live outcome (an error) for every message, never a preset value.
    with sqlite3.connect(tmp_path / "cache" / "facts.sqlite3") as db:
        rows = db.execute(
            "SELECT value, error FROM facts WHERE name = 'spam_probability'"
        ).fetchall()
    assert len(rows) == 7 and all(v is None and e for v, e in rows)
    # A warm run without presets reads the same cache and sees live values only.
    again = _preset_run(tmp_path, None)
    assert again["presets"] is None
    assert {r["name"]: r for r in again["rules"]}["classifier_spam"]["spam"] == 0
    assert again["original"]["figures"]["spam_stopped"]["k"] == 0


def test_preset_probabilities_refuse_rows_outside_the_train_split(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    presets = tmp_path / "oof.tsv"
    presets.write_text("spam/no-date.eml\t0.95\nspam/spoof.eml\t0.99\n")  # spoof: set test
    policy = tmp_path / "fixture_preset.toml"
    policy.write_text(PRESET_POLICY)
    _, labels, config = _setup(tmp_path, FIXTURE_ROWS)
    args = [*_tune_args(policy, labels, config, tmp_path), "--preset-probabilities", str(presets)]
    assert main(args) == 2
    assert "spam/spoof.eml" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
