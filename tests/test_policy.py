"""Policy engine: loading, validation (file, line, rule), decide() over hand-made facts."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from relay.cli.main import main
from relay.contracts import NullObserver
from relay.errors import FactError, PolicyError
from relay.facts import default_registry
from relay.facts.base import FactContext, FactRegistry, Facts, FactSpec, FactType, Services
from relay.message import Message
from relay.pipeline import actions
from relay.policy import Policy, check_files, compile_policy, load_policy, reload_policy
from relay.policy.holder import DeciderHolder
from relay.verdict import Action, Mode, Tier

REPO = Path(__file__).resolve().parents[1]

# name -> (type, tier) of the facts of the test registry
TYPES: dict[str, tuple[FactType, Tier]] = {
    "client_ip": (FactType.STR, Tier.CONNECTION),
    "tls_used": (FactType.BOOL, Tier.CONNECTION),
    "spf": (FactType.STR, Tier.ENVELOPE),
    "dmarc": (FactType.STR, Tier.ENVELOPE),
    "dmarc_policy": (FactType.STR, Tier.ENVELOPE),
    "recipient_count": (FactType.INT, Tier.ENVELOPE),
    "list_id": (FactType.STR, Tier.ENVELOPE),
    "rcpt_domains": (FactType.STR_LIST, Tier.ENVELOPE),
    "dkim": (FactType.OBJECT, Tier.ENVELOPE),
    "bulk_count": (FactType.INT, Tier.FINGERPRINT),
    "spam_probability": (FactType.FLOAT, Tier.CONTENT),
}


class World:
    """Fact values for one test, and how often each fact was computed."""

    def __init__(self, values: dict[str, Any], failing: tuple[str, ...] = ()) -> None:
        self.values = values
        self.failing = failing
        self.calls: Counter[str] = Counter()
        self.registry = FactRegistry(self._spec(name, t, tier) for name, (t, tier) in TYPES.items())

    def _spec(self, name: str, ftype: FactType, tier: Tier) -> FactSpec:
        async def compute(ctx: FactContext) -> Any:
            self.calls[name] += 1
            if name in self.failing:
                raise FactError(f"{name}: DNS timed out")
            return self.values.get(name)

        return FactSpec(name, ftype, tier, compute)

    def facts(self, message: Message, preset: dict[str, Any] | None = None) -> Facts:
        return Facts(self.registry, message, Services(), preset)

    def computed(self, *tiers: Tier) -> set[str]:
        return {n for n in self.calls if TYPES[n][1] in tiers}


def msg(*rcpts: str) -> Message:
    return Message.from_file_bytes(
        b"From: a@sender.test\r\nSubject: hi\r\n\r\nbody\r\n",
        received_at=1_795_000_000.0,
        mail_from="a@sender.test",
        rcpt_to=rcpts or ("bob@example.org",),
    )


HEAD = """
[policy]
name = "test"
mode = "enforce"

[policy.thresholds]
tag = 5
quarantine = 10
reject = 15
"""

AUTH_AND_CLASSIFIER = (
    HEAD
    + """
[[rule]]
name = "dmarc_reject"
when = 'dmarc == "fail" && dmarc_policy == "reject"'
action = "reject"
reason = "From domain's DMARC policy says reject"

[[rule]]
name = "spf_fail"
when = 'spf == "fail"'
score = 3
reason = "SPF fail"

[[rule]]
name = "classifier_spam"
when = "spam_probability >= 0.9"
score = 12
reason = "classifier says spam"

[[rule]]
name = "bulk"
when = "bulk_count > 50"
score = 4
reason = "bulk"
"""
)


async def decide(policy: Policy, world: World, message: Message | None = None) -> Any:
    return await policy.decide(message or msg(), world.facts(message or msg()))


# --- decide --------------------------------------------------------------------------


async def test_forced_reject_at_t1_never_computes_t2_or_t3() -> None:
    world = World({"dmarc": "fail", "dmarc_policy": "reject", "spf": "pass"})
    policy = compile_policy(AUTH_AND_CLASSIFIER, world.registry)
    verdict = await decide(policy, world)
    assert verdict.action is Action.REJECT
    assert verdict.forced_by == "dmarc_reject"
    assert verdict.reason == "From domain's DMARC policy says reject"
    assert verdict.highest_tier is Tier.ENVELOPE
    assert world.computed(Tier.FINGERPRINT, Tier.CONTENT) == set()
    # the T1 facts are pulled together (concurrently); rules stop after the forced reject
    assert {f.name for f in verdict.facts} == {"dmarc", "dmarc_policy", "spf"}
    assert dict(verdict.extra)["rules_evaluated"] == "1/4"


async def test_undecided_at_t1_pulls_higher_tiers_in_order() -> None:
    world = World({"dmarc": "pass", "spf": "fail", "spam_probability": 0.95, "bulk_count": 3})
    policy = compile_policy(AUTH_AND_CLASSIFIER, world.registry)
    verdict = await decide(policy, world)
    assert [h.rule for h in verdict.hits] == ["spf_fail", "classifier_spam"]
    assert verdict.score == 15
    assert verdict.action is Action.REJECT
    assert verdict.forced_by is None
    assert verdict.highest_tier is Tier.CONTENT
    # facts listed in the order they were pulled: T1, then T2, then T3
    tiers = [f.tier for f in verdict.facts]
    assert tiers == sorted(tiers)
    assert [f.name for f in verdict.facts][-1] == "spam_probability"


async def test_threshold_reject_reason_never_names_rules() -> None:
    world = World({"spf": "fail", "spam_probability": 0.99, "bulk_count": 0})
    verdict = await decide(compile_policy(AUTH_AND_CLASSIFIER, world.registry), world)
    assert verdict.action is Action.REJECT
    assert "SPF" not in verdict.reason and "classifier" not in verdict.reason
    assert verdict.reason == "Message rejected: spam score too high"


@pytest.mark.parametrize(
    ("probability", "spf", "action"),
    [(0.1, "pass", Action.ACCEPT), (0.1, "fail", Action.ACCEPT), (0.95, "pass", Action.QUARANTINE)],
)
async def test_score_thresholds_pick_action(probability: float, spf: str, action: Action) -> None:
    world = World({"spf": spf, "spam_probability": probability, "bulk_count": 0})
    verdict = await decide(compile_policy(AUTH_AND_CLASSIFIER, world.registry), world)
    assert verdict.action is action


async def test_early_stop_when_score_range_cannot_cross_a_threshold() -> None:
    text = (
        HEAD
        + """
[[rule]]
name = "many_rcpts"
when = "recipient_count > 10"
score = 20

[[rule]]
name = "content"
when = "spam_probability > 0.5"
score = 6
"""
    )
    world = World({"recipient_count": 50, "spam_probability": 0.9})
    verdict = await decide(compile_policy(text, world.registry), world)
    assert verdict.action is Action.REJECT
    assert world.calls["spam_probability"] == 0
    assert verdict.highest_tier is Tier.ENVELOPE

    # below the threshold the T3 rule could still change the action: it is computed
    world = World({"recipient_count": 1, "spam_probability": 0.9})
    verdict = await decide(compile_policy(text, world.registry), world)
    assert world.calls["spam_probability"] == 1
    assert verdict.action is Action.TAG

    # nothing fired at T1 and the T3 rule alone cannot reach a threshold: T3 is never read
    world = World({"recipient_count": 1, "spam_probability": 0.9})
    lower = compile_policy(text.replace("score = 6", "score = 4"), world.registry)
    verdict = await decide(lower, world)
    assert world.calls["spam_probability"] == 0
    assert verdict.action is Action.ACCEPT and verdict.highest_tier is Tier.ENVELOPE


async def test_remaining_negative_scores_prevent_early_stop() -> None:
    text = (
        HEAD
        + """
[[rule]]
name = "many_rcpts"
when = "recipient_count > 10"
score = 16

[[rule]]
name = "ham"
when = "spam_probability < 0.1"
score = -5
"""
    )
    world = World({"recipient_count": 50, "spam_probability": 0.01})
    verdict = await decide(compile_policy(text, world.registry), world)
    assert world.calls["spam_probability"] == 1
    assert verdict.action is Action.QUARANTINE
    assert verdict.score == 11


async def test_policy_with_nothing_to_decide_reads_no_fact() -> None:
    text = """
[policy]
name = "scores_only"
[[rule]]
name = "content"
when = "spam_probability > 0.5"
score = 3
"""
    world = World({"spam_probability": 0.9})
    verdict = await decide(compile_policy(text, world.registry), world)
    assert verdict.action is Action.ACCEPT
    assert verdict.highest_tier is None
    assert world.calls == Counter()


async def test_more_severe_forced_action_at_higher_tier_wins() -> None:
    text = (
        HEAD
        + """
[[rule]]
name = "newsletter"
when = 'list_id != ""'
action = "tag"
reason = "list mail"

[[rule]]
name = "certain_spam"
when = "spam_probability > 0.99"
action = "reject"
reason = "spam"
"""
    )
    world = World({"list_id": "news.example", "spam_probability": 0.999})
    verdict = await decide(compile_policy(text, world.registry), world)
    assert verdict.action is Action.REJECT
    assert verdict.forced_by == "certain_spam"
    assert verdict.reason == "spam"
    assert {h.rule for h in verdict.hits} == {"newsletter", "certain_spam"}


async def test_forced_accept_overrides_score_but_not_forced_reject() -> None:
    text = (
        HEAD
        + """
[[rule]]
name = "allow_internal"
when = 'client_ip == "10.0.0.1"'
action = "accept"

[[rule]]
name = "many_rcpts"
when = "recipient_count > 10"
score = 20

[[rule]]
name = "dmarc_reject"
when = 'dmarc == "fail"'
action = "reject"
"""
    )
    world = World({"client_ip": "10.0.0.1", "recipient_count": 50, "dmarc": "pass"})
    verdict = await decide(compile_policy(text, world.registry), world)
    assert verdict.action is Action.ACCEPT
    assert verdict.forced_by == "allow_internal"
    assert verdict.score == 20  # recorded, not acted on

    world = World({"client_ip": "10.0.0.1", "recipient_count": 1, "dmarc": "fail"})
    verdict = await decide(compile_policy(text, world.registry), world)
    assert verdict.action is Action.REJECT
    assert verdict.reason == "Message rejected: spam score too high" or verdict.reason


async def test_tiers_group_rules_and_keep_file_order_within_a_tier() -> None:
    text = """
[policy]
name = "order"
[policy.thresholds]
tag = 4
[[rule]]
name = "c_t3"
when = "spam_probability > 0.5"
score = 1
[[rule]]
name = "b_t1"
when = 'spf == "fail"'
score = 1
[[rule]]
name = "a_t0"
when = "!tls_used"
score = 1
[[rule]]
name = "d_t1"
when = "recipient_count > 1 && !tls_used"
score = 1
"""
    world = World({"spam_probability": 0.9, "spf": "fail", "tls_used": False, "recipient_count": 2})
    verdict = await decide(compile_policy(text, world.registry), world)
    assert [h.rule for h in verdict.hits] == ["a_t0", "b_t1", "d_t1", "c_t3"]
    assert [r.tier for r in compile_policy(text, world.registry).rules] == [
        Tier.CONTENT,
        Tier.ENVELOPE,
        Tier.CONNECTION,
        Tier.ENVELOPE,
    ]


async def test_failed_fact_is_missing_rule_skipped_with_reason() -> None:
    world = World({"spf": "fail", "spam_probability": 0.1, "bulk_count": 0}, failing=("dmarc",))
    verdict = await decide(compile_policy(AUTH_AND_CLASSIFIER, world.registry), world)
    assert verdict.action is Action.ACCEPT
    assert [s.rule for s in verdict.skipped] == ["dmarc_reject"]
    assert "dmarc" in verdict.skipped[0].reason and "timed out" in verdict.skipped[0].reason
    dmarc = next(f for f in verdict.facts if f.name == "dmarc")
    assert dmarc.error is not None and dmarc.value is None
    assert [h.rule for h in verdict.hits] == ["spf_fail"]


async def test_bad_runtime_value_skips_rule_instead_of_crashing() -> None:
    text = (
        HEAD
        + """
[[rule]]
name = "list_prefix"
when = 'list_id.startsWith("promo")'
score = 20
"""
    )
    world = World({"list_id": None})  # a STR fact may be None when absent
    verdict = await decide(compile_policy(text, world.registry), world)
    assert verdict.action is Action.ACCEPT
    assert verdict.skipped[0].rule == "list_prefix"
    assert verdict.skipped[0].reason.startswith("condition failed")


async def test_verdict_lists_only_facts_this_policy_requested() -> None:
    world = World({"spf": "fail", "tls_used": True})
    text = (
        HEAD
        + """
[[rule]]
name = "spf_fail"
when = 'spf == "fail"'
score = 6
"""
    )
    message = msg()
    # a shared Facts object: preset (lab cache) and already computed by another policy
    facts = world.facts(message, preset={"spam_probability": 0.5, "client_ip": "192.0.2.1"})
    await facts.get("tls_used")
    verdict = await compile_policy(text, world.registry).decide(message, facts)
    assert [f.name for f in verdict.facts] == ["spf"]
    assert verdict.highest_tier is Tier.ENVELOPE
    assert verdict.facts[0].seconds >= 0


async def test_preset_facts_are_used_without_computing() -> None:
    world = World({})
    policy = compile_policy(AUTH_AND_CLASSIFIER, world.registry)
    message = msg()
    preset = {"dmarc": "fail", "dmarc_policy": "reject", "spf": "pass"}
    verdict = await policy.decide(message, world.facts(message, preset))
    assert verdict.action is Action.REJECT
    assert world.calls == Counter()
    assert {f.name: f.value for f in verdict.facts} == preset


async def test_int_value_of_float_fact_is_coerced() -> None:
    text = (
        HEAD
        + """
[[rule]]
name = "sure"
when = "spam_probability + 0.0 >= 1.0"
score = 20
"""
    )
    world = World({"spam_probability": 1})
    verdict = await decide(compile_policy(text, world.registry), world)
    assert verdict.action is Action.REJECT and not verdict.skipped


async def test_list_and_object_facts_and_macros() -> None:
    text = (
        HEAD
        + """
[[rule]]
name = "ru"
when = 'rcpt_domains.exists(d, d.endsWith(".ru"))'
score = 5.5

[[rule]]
name = "dkim_signed"
when = '"sigs" in dkim && dkim.sigs.size() > 0'
score = -1
"""
    )
    world = World({"rcpt_domains": ["a.ru", "b.org"], "dkim": {"sigs": [{"d": "x"}]}})
    verdict = await decide(compile_policy(text, world.registry), world)
    assert [h.rule for h in verdict.hits] == ["ru", "dkim_signed"]
    assert verdict.score == 4.5
    assert verdict.action is Action.ACCEPT


async def test_shadow_mode_records_the_action_it_would_take() -> None:
    text = AUTH_AND_CLASSIFIER.replace('mode = "enforce"', 'mode = "shadow"')
    world = World({"dmarc": "fail", "dmarc_policy": "reject"})
    policy = compile_policy(text, world.registry)
    assert policy.mode is Mode.SHADOW
    verdict = await decide(policy, world)
    assert verdict.mode is Mode.SHADOW
    assert verdict.action is Action.REJECT
    assert actions.delivers(verdict)  # shadow mode delivers whatever it would do


OVERRIDES = (
    HEAD
    + """
[[rule]]
name = "many_rcpts"
when = "recipient_count > 1"
score = 12

[[override]]
domains = ["lenient.test", "*.lenient.test"]
[override.thresholds]
quarantine = 20
reject = 30

[[override]]
domains = ["trial.test"]
mode = "shadow"
"""
)


@pytest.mark.parametrize(
    ("rcpts", "action", "mode"),
    [
        (("a@example.org", "b@example.org"), Action.QUARANTINE, Mode.ENFORCE),
        (("a@lenient.test", "b@LENIENT.test"), Action.TAG, Mode.ENFORCE),
        (("a@sub.lenient.test", "b@lenient.test"), Action.TAG, Mode.ENFORCE),
        # several recipient domains: the strictest outcome wins
        (("a@lenient.test", "b@example.org"), Action.QUARANTINE, Mode.ENFORCE),
        (("a@trial.test", "b@trial.test"), Action.QUARANTINE, Mode.SHADOW),
        (("a@trial.test", "b@lenient.test"), Action.QUARANTINE, Mode.ENFORCE),
    ],
)
async def test_per_domain_overrides(rcpts: tuple[str, ...], action: Action, mode: Mode) -> None:
    world = World({"recipient_count": 2})
    policy = compile_policy(OVERRIDES, world.registry)
    verdict = await decide(policy, world, msg(*rcpts))
    assert (verdict.action, verdict.mode) == (action, mode)


async def test_policy_exposes_fact_names_mode_and_max_tier() -> None:
    world = World({})
    policy = compile_policy(AUTH_AND_CLASSIFIER, world.registry)
    assert policy.fact_names == {"dmarc", "dmarc_policy", "spf", "spam_probability", "bulk_count"}
    assert policy.mode is Mode.ENFORCE
    assert policy.max_tier is Tier.CONTENT
    assert policy.name == "test"


# --- validation ----------------------------------------------------------------------


def problems_of(text: str, registry: FactRegistry | None = None) -> list[str]:
    with pytest.raises(PolicyError) as info:
        compile_policy(text, registry or World({}).registry, "p.toml")
    return info.value.problems


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


BAD_RULES = [
    (
        "unknown fact",
        'when = "dmarc_polcy == \\"reject\\""',
        "unknown fact 'dmarc_polcy' (did you mean 'dmarc_policy'?)",
    ),
    ("wrong type op", 'when = "spf > 3"', "wrong type"),
    ("wrong type literal", 'when = "tls_used == \\"yes\\""', "fact 'tls_used' is bool"),
    ("wrong type number", 'when = "spam_probability > \\"high\\""', "wrong type"),
    ("not bool", 'when = "recipient_count"', "must give a bool"),
    ("syntax", 'when = "spf == "', "syntax error"),
    ("syntax2", 'when = "(spf == \\"x\\""', "syntax error"),
    ("nested type", 'when = "tls_used && spf + 1 > 2"', "wrong type"),
]


@pytest.mark.parametrize(("label", "when", "expected"), BAD_RULES, ids=[b[0] for b in BAD_RULES])
def test_condition_errors_name_file_line_and_rule(label: str, when: str, expected: str) -> None:
    text = HEAD + f'\n[[rule]]\nname = "r1"\nscore = 1\n{when}\n'
    problems = problems_of(text)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"p.toml:{line_of(text, 'when =')}: rule 'r1': ")
    assert expected in problems[0]


def test_every_problem_is_reported_with_its_line() -> None:
    text = """[policy]
name = "bad"
mode = "sometimes"
colour = "red"

[policy.thresholds]
tag = 10
quarantine = 5
reject = 15

[[rule]]
name = "dup"
when = "tls_used"
score = 1

[[rule]]
name = "dup"
when = "!tls_used"
score = 1

[[rule]]
name = "forced"
when = "tls_used"
action = "drop"

[[rule]]
name = "both"
when = "tls_used"
action = "reject"
score = 2

[[rule]]
name = "neither"
when = "tls_used"

[[rule]]
name = "typo_key"
when = "tls_used"
score = 1
resaon = "typo"

[[rule]]
when = "tls_used"
score = 1

[[rule]]
name = "bad reason"
when = "tls_used"
action = "reject"
reason = "line one\\r\\n250 injected"
"""
    problems = problems_of(text)
    expected = [
        "p.toml:3: [policy]: 'mode' must be",
        "p.toml:4: [policy]: unknown key 'colour'",
        "p.toml:6: [policy.thresholds]: thresholds out of order: tag (10) must be below",
        "p.toml:17: rule 'dup': duplicate rule name (first defined at line 11)",
        "p.toml:24: rule 'forced': unknown forced action 'drop'",
        "p.toml:26: rule 'both': a rule has either 'score' or 'action', not both",
        "p.toml:32: rule 'neither': a rule needs 'score' or a forced 'action'",
        "p.toml:40: rule 'typo_key': unknown key 'resaon'",
        "p.toml:42: rule #7: 'name' is missing",
        "p.toml:47: rule 'bad reason': name must be",
        "p.toml:50: rule 'bad reason': 'reason' must be one line of printable text",
    ]
    assert len(problems) == len(expected), "\n".join(problems)
    for problem, start in zip(problems, expected, strict=True):
        assert problem.startswith(start), (problem, start)


@pytest.mark.parametrize(
    ("thresholds", "message"),
    [
        ("tag = 5\nquarantine = 10\nreject = 10", "quarantine (10) must be below reject (10)"),
        ("tag = 20\nreject = 15", "tag (20) must be below reject (15)"),
        ("tempfail = 15\nreject = 15", "tempfail (15) must be below reject (15)"),
        ("tag = 5\ntempfail = 5\nreject = 15", "thresholds must be distinct"),
        ('tag = "5"', "threshold 'tag' must be a finite number"),
        ("nuke = 5", "unknown key 'nuke'"),
    ],
)
def test_threshold_errors(thresholds: str, message: str) -> None:
    text = f'[policy]\nname = "t"\n[policy.thresholds]\n{thresholds}\n'
    problems = problems_of(text)
    assert any(message in p for p in problems), problems
    assert all(p.startswith("p.toml:") for p in problems)


def test_override_errors() -> None:
    text = (
        HEAD
        + """
[[override]]
domains = ["a.test"]
mode = "loud"
[override.thresholds]
reject = 3

[[override]]
domains = ["A.test", "bad domain"]
"""
    )
    problems = problems_of(text)
    mode_line = line_of(text, 'mode = "loud"')
    assert any(p.startswith(f"p.toml:{mode_line}: override #1") for p in problems)
    assert any("quarantine (10) must be below reject (3)" in p for p in problems)
    assert any("domain 'a.test' is already in override #1" in p for p in problems)
    assert any("invalid domain 'bad domain'" in p for p in problems)


def test_toml_syntax_error_names_line() -> None:
    problems = problems_of('[policy]\nname = "x"\n\n[[rule]]\nname = "a\n')
    assert len(problems) == 1
    assert problems[0].startswith("p.toml:5: invalid TOML")


def test_multiline_condition_does_not_confuse_line_numbers() -> None:
    text = (
        HEAD
        + """
[[rule]]
name = "multi"
when = '''
spf == "fail" &&
[[rule]]
'''
score = 1

[[rule]]
name = "after"
when = "nope"
score = 1
"""
    )
    problems = problems_of(text)
    multi_line = line_of(text, "when = '''")
    assert any(p.startswith(f"p.toml:{multi_line}: rule 'multi': ") for p in problems)
    after = next(p for p in problems if "rule 'after'" in p)
    nope_line = line_of(text, 'when = "nope"')
    assert after.startswith(f"p.toml:{nope_line}: ")


def test_missing_policy_table_and_unknown_table() -> None:
    problems = problems_of('[[rules]]\nname = "x"\n')
    assert any("unknown key 'rules'" in p for p in problems)
    assert any("[policy]: the [policy] table is missing" in p for p in problems)


def test_load_policy_reads_file_and_reports_missing(tmp_path: Path) -> None:
    world = World({})
    path = tmp_path / "p.toml"
    path.write_text(AUTH_AND_CLASSIFIER)
    assert load_policy(path, world.registry).name == "test"
    with pytest.raises(PolicyError, match="file not found"):
        load_policy(tmp_path / "none.toml", world.registry)


def test_no_python_eval_in_conditions() -> None:
    # CEL has no access to Python: attribute tricks are unknown names or syntax errors.
    problems = problems_of(HEAD + '[[rule]]\nname = "x"\nscore = 1\nwhen = "__import__(\'os\')"\n')
    assert problems and all("rule 'x'" in p for p in problems)


# --- CLI and reload ------------------------------------------------------------------

GOOD_T1 = """
[policy]
name = "t1"
[policy.thresholds]
tag = 1
[[rule]]
name = "many"
when = "recipient_count > 5"
score = 2
"""


def test_cli_policy_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.toml"
    good.write_text(GOOD_T1)
    bad1 = tmp_path / "bad1.toml"
    bad1.write_text(GOOD_T1.replace("recipient_count", "recipient_cnt"))
    bad2 = tmp_path / "bad2.toml"
    bad2.write_text(GOOD_T1.replace("tag = 1", "tag = 1\nreject = 0"))
    assert main(["policy", "check", str(good)]) == 0
    assert f"ok: {good}: policy 't1' (enforce), 1 rules (T1 1), 0 override(s), reads up to T1" in (
        capsys.readouterr().out
    )
    assert main(["policy", "check", str(good), str(bad1), str(bad2)]) == 1
    err = capsys.readouterr().err
    assert f"{bad1}:8: rule 'many': unknown fact 'recipient_cnt'" in err
    assert f"{bad2}:4: [policy.thresholds]: thresholds out of order" in err


def test_check_files_collects_all_files(tmp_path: Path) -> None:
    paths = []
    for i in range(2):
        path = tmp_path / f"b{i}.toml"
        path.write_text(GOOD_T1.replace("score = 2", 'action = "nuke"'))
        paths.append(path)
    problems = check_files(paths, default_registry())
    assert [p.split(":")[0] for p in problems] == [str(p) for p in paths]


@pytest.mark.parametrize(
    "bad",
    [
        '"x\\r\\nX-Injected: 1"',
        '"t1\\n"',
        '"two words"',
        '"x;y"',
        '"-lead"',
        '"' + "a" * 65 + '"',
        '"""t1\nsecond"""',
    ],
)
def test_policy_and_rule_names_are_limited_to_a_safe_set(tmp_path: Path, bad: str) -> None:
    """Issue 15: a policy name goes into X-Spam-Status and log lines; CR/LF (or any other
    character outside the safe set) must fail `relay policy check` and reload, with file and
    line, instead of a 451 and a traceback on every tagged message."""
    as_policy = GOOD_T1.replace('name = "t1"', f"name = {bad}")
    problems = problems_of(as_policy)
    assert len(problems) == 1 and problems[0].startswith("p.toml:3: [policy]: name "), problems
    assert "\n" not in problems[0] and "must be 1-64 letters" in problems[0]
    as_rule = GOOD_T1.replace('name = "many"', f"name = {bad}")
    (problem,) = problems_of(as_rule)
    assert problem.startswith("p.toml:") and "name must be 1-64 letters" in problem
    assert "\n" not in problem

    path = tmp_path / "p.toml"
    path.write_text(as_policy)
    holder = DeciderHolder()
    assert not reload_policy(holder, path, default_registry(), CountingObserver())
    assert holder.generation == 0
    assert main(["policy", "check", str(path)]) == 1


class CountingObserver(NullObserver):
    def __init__(self) -> None:
        self.reloads: list[bool] = []

    def policy_reload(self, ok: bool) -> None:
        self.reloads.append(ok)


def test_reload_swaps_good_and_keeps_old_on_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry = default_registry()
    path = tmp_path / "p.toml"
    path.write_text(GOOD_T1)
    holder = DeciderHolder()
    observer = CountingObserver()
    assert reload_policy(holder, path, registry, observer)
    first = holder.current
    assert first.name == "t1" and holder.generation == 1

    path.write_text(GOOD_T1.replace("recipient_count", "nope"))
    with caplog.at_level(logging.ERROR, logger="relay.policy"):
        assert not reload_policy(holder, path, registry, observer)
    assert holder.current is first and holder.generation == 1
    assert "unknown fact 'nope'" in caplog.text
    assert observer.reloads == [True, False]


def test_cli_reload_refuses_broken_policy_and_signals_good(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text(GOOD_T1.replace("recipient_count", "nope"))
    config = tmp_path / "relay.toml"
    config.write_text(f'[policy]\npath = "{policy}"\n')
    pidfile = tmp_path / "relay.pid"
    pidfile.write_text("999999999\n")
    args = ["policy", "reload", "--config", str(config), "--pidfile", str(pidfile)]
    assert main(args) == 1
    assert "not reloading" in capsys.readouterr().err
    policy.write_text(GOOD_T1)
    assert main(args) == 2  # valid, but no such process: a clear error, no signal sent
    assert "no process 999999999" in capsys.readouterr().err


# --- the shipped default policy ------------------------------------------------------


def test_default_policy_is_valid() -> None:
    registry = default_registry()
    path = REPO / "config" / "policy.toml"
    policy = load_policy(path, registry)  # PolicyError, never a skip, on an unknown fact
    assert policy.name == "default"
    assert policy.max_tier is Tier.CONTENT


# --- cost budget (issue 15, finding 6) -----------------------------------------------


def _literal_list(n: int) -> str:
    return "[" + ", ".join(str(i) for i in range(1, n + 1)) + "]"


def _cube(n: int) -> str:
    """CEL has no range syntax (`[1..40]` does not parse): a written-out list instead."""
    items = _literal_list(n)
    return f"{items}.all(a, {items}.all(b, {items}.all(c, true)))"


def _policy_with(when: str, extra: str = "") -> str:
    return GOOD_T1 + f"{extra}[[rule]]\nname = \"costly\"\nwhen = '{when}'\nscore = 1\n"


@pytest.mark.parametrize("n", [40, 100])
def test_costly_comprehension_is_rejected_at_load(tmp_path: Path, n: int) -> None:
    """Issue 15: 40x40x40 cost 342 ms per message on the event loop, 100x100x100 33 s in
    `relay policy check` (the load-time probes run the program): rejected before running."""
    text = _policy_with(_cube(n))
    (problem,) = problems_of(text)
    line = line_of(text, 'name = "costly"')
    assert problem.startswith(f"p.toml:{line + 1}: rule 'costly': too costly: "), problem
    assert "nested 3 deep, at most 2" in problem

    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(PolicyError) as info:
        load_policy(path, default_registry())
    assert info.value.problems[0].startswith(f"{path}:{line + 1}: rule 'costly': too costly")
    assert main(["policy", "check", str(path)]) == 1


def test_cli_policy_check_reports_cost(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "p.toml"
    path.write_text(_policy_with(_cube(100)))
    assert main(["policy", "check", str(path)]) == 1
    assert "rule 'costly': too costly" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("when", "expected"),
    [
        # two levels are allowed, but not 150 x 150 steps
        (f"{_literal_list(150)}.all(a, {_literal_list(150)}.all(b, a != b))", "steps per message"),
        # a list fact counts as 1,000 elements: nested over two of them is too much
        ("rcpt_domains.exists(a, rcpt_domains.exists(b, a == b))", "steps per message"),
        # map and filter copy their partial result per element: quadratic in the binding
        ("rcpt_domains.filter(d, true).size() > 1", "steps per message"),
        # chaining counts as nesting: each stage may grow the values (x + x doubles)
        ('["a"].map(x, x + x).map(y, y + y).map(z, z + z).size() > 0', "nested 3 deep"),
        # a comprehension over another's result counts too
        ("[[1]].all(a, a.map(x, x).exists(y, [1].all(z, true)))", "nested 3 deep"),
        ("recipient_count > 0" + " || recipient_count > 0" * 100, "too long"),
    ],
)
def test_cost_budget_rejects(when: str, expected: str) -> None:
    (problem,) = problems_of(_policy_with(when))
    assert "rule 'costly'" in problem and expected in problem, problem


@pytest.mark.parametrize(
    "when",
    [
        'rcpt_domains.exists(d, d.endsWith(".ru") || d.endsWith(".cn"))',
        'rcpt_domains.all(d, d != "")',
        f"{_literal_list(40)}.all(a, {_literal_list(40)}.all(b, a + b > 0))",
        "[1, 2, 3].map(x, x * 2).exists(y, y > 4)",
        '{"a": 1, "b": 2}.all(k, k != "")',
        # macro names inside strings and comments are text, not comprehensions
        '"x.all(a, [1].all(b, [1].all(c, true)))" != list_id',
    ],
)
def test_cost_budget_accepts_ordinary_conditions(when: str) -> None:
    policy = compile_policy(_policy_with(when), World({}).registry, "p.toml")
    assert [r.name for r in policy.rules] == ["many", "costly"]


def test_condition_cost_estimate() -> None:
    from relay.policy.expr import LIST_FACT_MAX, MAX_COST, condition_cost

    assert condition_cost('dmarc == "fail" && dmarc_policy == "reject"').steps == 7
    assert condition_cost("dmarc == 'x.all(a, true)'").depth == 0
    flat = condition_cost("[1, 2, 3].all(x, x > 0)")
    assert flat.depth == 1 and flat.steps == 3 + 3 * (3 + 1)
    assert condition_cost("rcpt_domains.exists(d, true)").steps >= LIST_FACT_MAX
    assert condition_cost(_cube(40)).steps > MAX_COST
    assert condition_cost(_cube(40)).depth == 3
    # a raw string ends at its first quote; a triple-quoted one may hold quotes
    assert condition_cost('r"\\" + """".all(""" == "" && [1].all(x, true)').depth == 1


def test_shipped_policies_are_within_the_cost_budget() -> None:
    from relay.policy.expr import MAX_COST, MAX_DEPTH, MAX_LENGTH, condition_cost

    registry = default_registry()
    for path in [
        REPO / "config" / "policy.toml",
        *sorted((REPO / "config/regimes").glob("*.toml")),
    ]:
        for rule in load_policy(path, registry).rules:
            cost = condition_cost(rule.when)
            assert cost.steps <= MAX_COST and cost.depth <= MAX_DEPTH, (path, rule.name)
            assert len(rule.when) <= MAX_LENGTH


# --- required facts: fail closed -------------------------------------------------------


class BrokenWorld(World):
    """``broken`` facts fail the way an outage does (the model, the state backend), not
    the way a merely absent fact does (a plain FactError)."""

    def __init__(self, values: dict[str, Any], broken: dict[str, Exception]) -> None:
        self.broken = broken
        super().__init__(values)

    def _spec(self, name: str, ftype: FactType, tier: Tier) -> FactSpec:
        async def compute(ctx: FactContext) -> Any:
            self.calls[name] += 1
            if name in self.broken:
                raise self.broken[name]
            return self.values.get(name)

        return FactSpec(name, ftype, tier, compute)


REQUIRED = AUTH_AND_CLASSIFIER.replace(
    'mode = "enforce"', 'mode = "enforce"\nrequired = ["spam_probability"]'
)


async def test_a_required_fact_that_fails_defers_the_message() -> None:
    from relay.errors import ModelError

    values = {"spf": "pass", "dmarc": "pass", "bulk_count": 0}
    world = BrokenWorld(values, {"spam_probability": ModelError("classifier pool died")})
    verdict = await decide(compile_policy(REQUIRED, world.registry), world)
    assert verdict.action is Action.TEMPFAIL
    assert "requires is unavailable" in verdict.reason
    assert dict(verdict.extra)["unavailable"] == "spam_probability"
    assert actions.effect(verdict).reply is not None
    # Without `required` the same failure fails open, as before.
    world = BrokenWorld(values, {"spam_probability": ModelError("classifier pool died")})
    verdict = await decide(compile_policy(AUTH_AND_CLASSIFIER, world.registry), world)
    assert verdict.action is Action.ACCEPT


async def test_a_required_fact_merely_absent_or_a_reject_is_not_deferred() -> None:
    from relay.errors import ModelError

    # absent (a plain FactError: nothing failed) -> the rules decide as usual
    world = World({"spf": "pass", "dmarc": "pass", "bulk_count": 0}, failing=("spam_probability",))
    verdict = await decide(compile_policy(REQUIRED, world.registry), world)
    assert verdict.action is Action.ACCEPT
    # a forced reject decided at T1 never reads the classifier: no deferral
    values = {"dmarc": "fail", "dmarc_policy": "reject"}
    world = BrokenWorld(values, {"spam_probability": ModelError("down")})
    verdict = await decide(compile_policy(REQUIRED, world.registry), world)
    assert verdict.action is Action.REJECT and world.calls["spam_probability"] == 0


def test_required_facts_are_checked_at_load() -> None:
    bad = AUTH_AND_CLASSIFIER.replace('mode = "enforce"', 'mode = "enforce"\nrequired = ["nope"]')
    assert any("required fact 'nope' is not a known fact" in p for p in problems_of(bad))
    unread = AUTH_AND_CLASSIFIER.replace(
        'mode = "enforce"', 'mode = "enforce"\nrequired = ["tls_used"]'
    )
    assert any("read by no rule" in p for p in problems_of(unread))
    wrong = AUTH_AND_CLASSIFIER.replace('mode = "enforce"', 'mode = "enforce"\nrequired = "x"')
    assert any("must be a list of fact names" in p for p in problems_of(wrong))
