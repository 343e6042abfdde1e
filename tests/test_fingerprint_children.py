"""The bulk fingerprint computed by the classifier's children (a relay worker never loads
numpy, issue 17): the keys are the ones the in-process fallback computes, since they are
stored state keys every worker and instance shares."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest

from relay.analysis import MODULE as ANALYSIS_MODULE
from relay.classifier.child import FINGERPRINT, load
from relay.classifier.minhash import fingerprint
from relay.classifier.serving import CHILD_MODULE, Classifier
from relay.errors import ModelError
from relay.facts import bulk, text
from relay.facts.base import FactRegistry, Facts, missing_services
from relay.facts.services import Services
from relay.message import Message

MODEL = Path(__file__).resolve().parents[1] / "models" / "spam.skops"
TEXTS = (
    "",
    "two words",  # fewer tokens than a shingle
    "Grüße aus Köln: Прошу оплатить счёт № 42 до пятницы 今日は https://x.example/p?id=7",
    " ".join(f"word{i % 997} token{i % 13}" for i in range(60_000)),  # ~1 MB of text
    "line one\r\nline two\n\nlast line\u2028with a separator",
)


def test_the_child_answers_the_in_process_keys(tmp_path: Path) -> None:
    # No model is needed: a fingerprint request never touches it.
    served = load(tmp_path / "absent.skops")
    for t in TEXTS:
        answer = served.handle(FINGERPRINT + t.encode())
        assert tuple(answer.decode().split("\n")) == fingerprint(t)
    batch = served.handle_many([FINGERPRINT + t.encode() for t in TEXTS])
    assert batch == [served.handle(FINGERPRINT + t.encode()) for t in TEXTS]


@pytest.mark.parametrize("module", [CHILD_MODULE, ANALYSIS_MODULE])
async def test_a_classifier_pool_fingerprints_as_this_process_does(module: str) -> None:
    if not MODEL.exists():
        pytest.skip(f"{MODEL} is not built")
    classifier = await Classifier.open(MODEL, workers=1, module=module)
    try:
        for t in TEXTS:
            assert await classifier.fingerprint(t) == fingerprint(t)
        assert classifier.pending == 0
    finally:
        await classifier.close()


async def test_a_full_classifier_refuses_a_fingerprint_at_once() -> None:
    class Idle:  # a pool that would answer nothing: the bound must refuse before asking
        async def call(self, *args: object, **kwargs: object) -> bytes:
            raise AssertionError("sent to a child")

    info: Any = None
    classifier = Classifier(cast(Any, Idle()), info, 1 << 20, 1.0, max_pending=0)
    with pytest.raises(ModelError, match="pending"):
        await classifier.fingerprint("some text")


class Children:
    """Stands in for the classifier's children: records what it was asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def fingerprint(self, text: str) -> tuple[str, ...]:
        self.asked.append(text)
        return fingerprint(text)


REGISTRY = FactRegistry((*bulk.FACTS, *text.FACTS))
T0 = 1_773_133_200.0
RAW = b"From: a@x.example\nTo: b@y.example\nSubject: s\n\nBuy cheap watches now, best prices here\n"


async def test_the_fact_asks_the_children_when_there_are_some() -> None:
    children = Children()
    services = Services(classifier=cast(Any, children))
    keys = await Facts(REGISTRY, Message.from_file_bytes(RAW, received_at=T0), services).get(
        "bulk_fingerprint"
    )
    assert children.asked == ["Buy cheap watches now, best prices here"]
    alone = await Facts(REGISTRY, Message.from_file_bytes(RAW, received_at=T0), Services()).get(
        "bulk_fingerprint"
    )
    assert keys == alone == ["bulk:" + k for k in fingerprint(children.asked[0])]


def test_without_children_the_fingerprint_is_no_missing_service() -> None:
    # The relay with [model] enabled = false starts: bulk facts need only the state store.
    found = missing_services(REGISTRY, ["bulk_fingerprint"], Services())
    assert found == []
    needs = missing_services(REGISTRY, ["bulk_count"], Services())
    assert [(fact, key.field) for _read, fact, key in needs] == [("bulk_count", "state")]
    assert [k.field for k in REGISTRY["bulk_fingerprint"].needs] == ["classifier"]
