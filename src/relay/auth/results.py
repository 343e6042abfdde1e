"""Value objects for sender-authentication results (DKIM, SPF, DMARC, ARC).

Result words are RFC 8601's: pass, fail, softfail, neutral, none, temperror, permerror
(and policy). Everything here is frozen and turns into JSON-able mappings with
``to_dict``, which is what the ``auth_results`` fact exposes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# How good a DKIM result is, best first: the message's DKIM result is its best signature's.
# temperror ranks above fail because a retry could still pass.
DKIM_RANK = ("pass", "temperror", "fail", "policy", "neutral", "permerror", "none")


def _fields(obj: Any) -> dict[str, Any]:
    """A flat result's fields, tuples as lists. ``dataclasses.asdict`` deep-copies every
    value and was 0.06 ms of each message's authentication in the relay."""
    out = {}
    for name in obj.__slots__:
        value = getattr(obj, name)
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


def _from_fields(cls: Any, data: dict[str, Any]) -> Any:
    """The inverse of ``_fields`` (lists back to tuples); keys that are not fields, such
    as the derived ones ``to_dict`` adds, are ignored."""
    return cls(
        **{
            name: tuple(data[name]) if isinstance(data[name], list) else data[name]
            for name in cls.__slots__
            if name in data
        }
    )


@dataclass(frozen=True, slots=True)
class DkimSignatureResult:
    """The outcome of one DKIM-Signature header field, in message order (index 0 = top)."""

    index: int
    result: str
    reason: str = ""
    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    canonicalization: str = ""
    identity: str = ""  # i= (AUID)
    headers: tuple[str, ...] = ()  # h=, lower-cased, in order
    body_length: int | None = None  # l=: only this many body bytes are covered
    signed_at: int | None = None  # t=
    expires: int | None = None  # x=
    key_bits: int | None = None
    weak: bool = False  # rsa-sha1 (RFC 8301) or a key under 2048 bits
    b_prefix: str = ""  # first characters of b=, to tell signatures apart (RFC 6008)

    def to_dict(self) -> dict[str, Any]:
        return _fields(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DkimSignatureResult:
        result: DkimSignatureResult = _from_fields(cls, data)
        return result


@dataclass(frozen=True, slots=True)
class DkimResults:
    """Every DKIM-Signature of a message; only the first ``limit`` are verified."""

    signatures: tuple[DkimSignatureResult, ...] = ()
    total: int = 0  # DKIM-Signature fields present
    limit: int = 10
    note: str = ""

    @property
    def result(self) -> str:
        if not self.signatures:
            return "none"
        return min((s.result for s in self.signatures), key=_dkim_rank)

    @property
    def passing(self) -> tuple[DkimSignatureResult, ...]:
        return tuple(s for s in self.signatures if s.result == "pass")

    def to_dict(self) -> dict[str, Any]:
        return {
            "result": self.result,
            "total": self.total,
            "verified": min(self.total, self.limit),
            "limit": self.limit,
            "note": self.note,
            "signatures": [s.to_dict() for s in self.signatures],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DkimResults:
        return cls(
            signatures=tuple(DkimSignatureResult.from_dict(s) for s in data["signatures"]),
            total=data["total"],
            limit=data["limit"],
            note=data["note"],
        )


def _dkim_rank(result: str) -> int:
    return DKIM_RANK.index(result) if result in DKIM_RANK else len(DKIM_RANK)


@dataclass(frozen=True, slots=True)
class SpfResult:
    """One SPF check (RFC 7208) of one identity: ``mailfrom`` or ``helo``."""

    identity: str  # "mailfrom" | "helo"
    result: str
    domain: str = ""
    sender: str = ""  # the <sender> checked (postmaster@helo for helo and null senders)
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return _fields(self)


@dataclass(frozen=True, slots=True)
class DmarcResult:
    """DMARC (RFC 7489) for the RFC5322.From domain."""

    result: str  # pass | fail | none | temperror | permerror
    from_domain: str = ""
    org_domain: str = ""
    record_domain: str = ""  # where the record was found (from or org domain)
    policy: str = ""  # what the domain asks for this message (after sp= and pct=), "" if none
    published_policy: str = ""  # p= or sp=, whichever applies to the From domain
    p: str = ""  # the record's p=
    sp: str = ""  # the record's sp= (p= when absent)
    pct: int = 100
    sampled_out: bool = False  # pct < 100 and this message fell outside the sample
    adkim: str = "r"
    aspf: str = "r"
    dkim_aligned: bool = False
    spf_aligned: bool = False
    dkim_domain: str = ""  # the aligned passing DKIM domain, if any
    reason: str = ""

    @property
    def aligned(self) -> bool:
        return self.dkim_aligned or self.spf_aligned

    def to_dict(self) -> dict[str, Any]:
        out = _fields(self)
        out["aligned"] = self.aligned
        return out


@dataclass(frozen=True, slots=True)
class ArcResult:
    """ARC chain validation (RFC 8617) by dkimpy."""

    result: str  # pass | fail | none | temperror
    instances: int = 0
    oldest_pass: int | None = None  # lowest instance whose ARC-Message-Signature verifies
    domains: tuple[str, ...] = ()  # ARC-Seal d= of each instance, newest first
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return _fields(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArcResult:
        result: ArcResult = _from_fields(cls, data)
        return result


@dataclass(frozen=True, slots=True)
class AuthResults:
    """Everything sender authentication found out about one message."""

    dkim: DkimResults = field(default_factory=DkimResults)
    spf: SpfResult = field(default_factory=lambda: SpfResult("mailfrom", "none"))
    spf_helo: SpfResult = field(default_factory=lambda: SpfResult("helo", "none"))
    dmarc: DmarcResult = field(default_factory=lambda: DmarcResult("none"))
    arc: ArcResult = field(default_factory=lambda: ArcResult("none"))
    from_domain: str = ""
    client_ip: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "dkim": self.dkim.to_dict(),
            "spf": self.spf.to_dict(),
            "spf_helo": self.spf_helo.to_dict(),
            "dmarc": self.dmarc.to_dict(),
            "arc": self.arc.to_dict(),
            "from_domain": self.from_domain,
            "client_ip": self.client_ip,
            "seconds": round(self.seconds, 6),
        }
