"""relay/classifier/child.py: the requests it answers, in this process (the pipe transport
with real children: tests/test_classifier_recovery.py, tests/test_hang_overload.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from relay.classifier.child import BASE_SCORE, CLASSIFY, INFO, Served, decode_answer, load
from relay.errors import ModelError

MODEL = Path(__file__).resolve().parents[1] / "models" / "spam.skops"
HAM = b"From: a@sender.test\r\nSubject: lunch\r\n\r\nShall we meet at noon on Friday?\r\n"
SPAM = b"From: win@prize.test\r\nSubject: WINNER\r\n\r\nClaim your FREE prize now!!! $$$\r\n"


@pytest.fixture(scope="module")
def served() -> Served:
    if not MODEL.exists():
        pytest.skip(f"{MODEL} is not built")
    return load(MODEL)


def test_a_batch_answers_as_each_request_alone(served: Served) -> None:
    requests = [CLASSIFY + HAM, INFO, CLASSIFY + SPAM, CLASSIFY + b"\x00\xff junk"]
    alone = [served.handle(r) for r in requests]
    together = served.handle_many(requests)
    for k in (0, 2, 3):
        (p_batch, degraded_batch), (p_alone, degraded_alone) = map(
            decode_answer, (together[k], alone[k])
        )
        assert p_batch == pytest.approx(p_alone) and degraded_batch is degraded_alone
    assert together[1] == alone[1]
    info = json.loads(alone[1])
    assert info["version"] and info["max_raw_bytes"] > 0
    assert decode_answer(alone[3])[1] is True  # unparsable: degraded


def test_base_score_names_the_root_model(served: Served) -> None:
    answer = json.loads(served.handle(BASE_SCORE + HAM))
    card = json.loads(MODEL.with_name(MODEL.stem + ".card.json").read_text())
    assert answer["sha256"] == card["model_sha256"] and 0.0 <= answer["p"] <= 1.0


def test_unknown_requests_and_a_missing_model_are_errors(tmp_path: Path) -> None:
    missing = load(tmp_path / "absent.skops")
    assert "model file not found" in json.loads(missing.handle(INFO))["error"]
    with pytest.raises(ModelError, match="not found"):
        missing.handle(CLASSIFY + HAM)
    with pytest.raises(ValueError, match="unknown request"):
        missing.handle(b"X")
