"""The services fact functions use, as one frozen, typed object.

``assembly.open_services`` builds ``Services`` once per process (the relay's lifespan,
``relay scan`` and the lab alike); a field is None when that service is not configured
(``[auth] enabled = false``, ``[model] enabled = false``, the lab's offline or parallel
pass, the oracle lists outside the lab).

A fact declares the services it uses (``FactSpec.needs``, a tuple of the keys below) and
asks for them with ``ctx.service(KEY)``, which returns the typed service or raises
FactError. Declaring them lets the relay refuse to start when its policy reads a fact
whose service is not configured (``facts.base.missing_services``), instead of finding out message
by message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast

from relay.errors import FactError

if TYPE_CHECKING:
    from publicsuffixlist import PublicSuffixList

    from relay.auth.checker import Authenticator
    from relay.classifier.serving import Classifier
    from relay.config import GreylistSettings, RateLimitSettings
    from relay.dns import Resolver
    from relay.facts.oraclelists import OracleLists
    from relay.state import StateStore

S = TypeVar("S")


class Fingerprinter(Protocol):
    """The classifier's children (classifier/serving.py Classifier): the band keys of a
    body's MinHash fingerprint (classifier/minhash.py), computed off the relay worker."""

    async def fingerprint(self, text: str) -> tuple[str, ...]: ...


class ReputationReader(Protocol):
    """Learned reputation (feedback/store.py FeedbackStore): decayed (spam, ham) report
    counts of plain domains, kind "sender" or "link". Only reads."""

    async def standings(
        self, kind: str, domains: Sequence[str], *, now: float
    ) -> list[tuple[float, float]]: ...


@dataclass(frozen=True, slots=True)
class Services:
    """Long-lived services handed to fact functions; None when not configured."""

    resolver: Resolver | None = None  # the one DNS cache every check shares
    state: StateStore | None = None  # counters every worker shares (bulk, rates)
    psl: PublicSuffixList | None = None  # organisational domains
    authenticator: Authenticator | None = None  # DKIM/SPF/DMARC/ARC ([auth] enabled)
    classifier: Classifier | None = None  # the audited model ([model] enabled)
    oracle: OracleLists | None = None  # the lab's address lists (lab only)
    reputation: ReputationReader | None = None  # the feedback store's reputation counters
    greylist: GreylistSettings | None = None  # [greylist]: delay, windows, exemptions
    ratelimit: RateLimitSettings | None = None  # [ratelimit]: the token buckets

    def require(self, key: Service[S]) -> S:
        """The service, or FactError naming it when it is not configured (None for an
        optional key)."""
        value = getattr(self, key.field)
        if value is None and not key.optional:
            raise FactError(not_configured(key))
        return cast(S, value)


@dataclass(frozen=True, slots=True)
class Service(Generic[S]):
    """A typed key naming one field of ``Services`` (what a FactSpec ``needs``)."""

    field: str
    setting: str = ""  # why it can be missing, for start-up errors
    # The fact works without it (None): never a start-up error (facts.base.missing_services).
    optional: bool = False

    def __post_init__(self) -> None:
        if self.field not in Services.__dataclass_fields__:
            raise ValueError(f"Services has no field {self.field!r}")


def not_configured(key: Service[Any]) -> str:
    """The FactError text for a missing service (the lab defers facts that say it)."""
    return f"service {key.field} is not configured"


RESOLVER: Service[Resolver] = Service("resolver")
STATE: Service[StateStore] = Service("state")
PSL: Service[PublicSuffixList] = Service("psl")
AUTHENTICATOR: Service[Authenticator] = Service("authenticator", "[auth] enabled = false")
CLASSIFIER: Service[Classifier] = Service("classifier", "[model] enabled = false")
# The same children, optional: without them (model disabled, the lab, relay scan) the
# fingerprint is computed in process (facts/bulk.py).
FINGERPRINTER: Service[Fingerprinter | None] = Service("classifier", optional=True)
ORACLE: Service[OracleLists] = Service("oracle", "lab only: relay lab --inputs")
REPUTATION: Service[ReputationReader] = Service(
    "reputation", "the feedback store is not opened (relay scan)"
)
GREYLIST: Service[GreylistSettings] = Service("greylist", "[greylist] is not configured here")
RATELIMIT: Service[RateLimitSettings] = Service("ratelimit", "[ratelimit] is not configured here")
