"""T1 facts of sender authentication: DKIM, SPF, DMARC, ARC (docs/authentication.md).

``auth_results`` runs every check once (through the Authenticator service) and holds the
whole result as a JSON-able mapping; the other facts are views of it. They report, never
decide: what a ``dmarc == "fail"`` costs is the policy's business.
"""

from __future__ import annotations

from typing import Any

from relay.facts.base import FactContext, FactSpec, FactType
from relay.facts.services import AUTHENTICATOR
from relay.verdict import Tier

RESULTS = "auth_results"


async def _auth_results(ctx: FactContext) -> dict[str, Any]:
    results = await ctx.service(AUTHENTICATOR).check(ctx.message)
    return results.to_dict()


async def _all(ctx: FactContext) -> dict[str, Any]:
    value: dict[str, Any] = await ctx.get(RESULTS)
    return value


async def _dkim(ctx: FactContext) -> dict[str, Any]:
    dkim: dict[str, Any] = (await _all(ctx))["dkim"]
    return dkim


async def _dkim_result(ctx: FactContext) -> str:
    return str((await _dkim(ctx))["result"])


def _passing(dkim: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in dkim["signatures"] if s["result"] == "pass"]


async def _dkim_domains_pass(ctx: FactContext) -> list[str]:
    return sorted({str(s["domain"]) for s in _passing(await _dkim(ctx))})


async def _dkim_key_bits(ctx: FactContext) -> int:
    bits = [int(s["key_bits"]) for s in _passing(await _dkim(ctx)) if s.get("key_bits")]
    return min(bits) if bits else 0


async def _dkim_weak(ctx: FactContext) -> bool:
    return any(s.get("weak") for s in _passing(await _dkim(ctx)))


async def _spf(ctx: FactContext) -> str:
    return str((await _all(ctx))["spf"]["result"])


async def _spf_domain(ctx: FactContext) -> str:
    return str((await _all(ctx))["spf"]["domain"])


async def _spf_helo(ctx: FactContext) -> str:
    return str((await _all(ctx))["spf_helo"]["result"])


async def _dmarc(ctx: FactContext) -> str:
    return str((await _all(ctx))["dmarc"]["result"])


async def _dmarc_policy(ctx: FactContext) -> str:
    return str((await _all(ctx))["dmarc"]["policy"])


async def _dmarc_aligned(ctx: FactContext) -> bool:
    return bool((await _all(ctx))["dmarc"]["aligned"])


async def _arc(ctx: FactContext) -> str:
    return str((await _all(ctx))["arc"]["result"])


async def _from_domain(ctx: FactContext) -> str:
    return str((await _all(ctx))["from_domain"])


def _view(name: str, kind: FactType, compute: Any, doc: str) -> FactSpec:
    return FactSpec(name, kind, Tier.ENVELOPE, compute, depends=(RESULTS,), doc=doc)


FACTS = (
    FactSpec(
        RESULTS,
        FactType.OBJECT,
        Tier.ENVELOPE,
        _auth_results,
        needs=(AUTHENTICATOR,),
        doc="every authentication result of the message (dkim, spf, spf_helo, dmarc, arc)",
    ),
    _view(
        "dkim",
        FactType.OBJECT,
        _dkim,
        "DKIM: best result, per-signature results (domain, selector, algorithm, result, "
        "reason, key bits, h=), and how many were verified",
    ),
    _view(
        "dkim_result",
        FactType.STR,
        _dkim_result,
        "best DKIM result: pass, temperror, fail, permerror, neutral or none",
    ),
    _view(
        "dkim_domains_pass",
        FactType.STR_LIST,
        _dkim_domains_pass,
        "d= domains of the passing DKIM signatures",
    ),
    _view(
        "dkim_key_bits",
        FactType.INT,
        _dkim_key_bits,
        "smallest key size among passing DKIM signatures (0: none passed)",
    ),
    _view(
        "dkim_weak", FactType.BOOL, _dkim_weak, "a passing DKIM signature uses rsa-sha1 (RFC 8301)"
    ),
    _view(
        "spf", FactType.STR, _spf, "SPF result for MAIL FROM (postmaster@HELO for the null sender)"
    ),
    _view("spf_domain", FactType.STR, _spf_domain, "domain SPF checked for MAIL FROM"),
    _view("spf_helo", FactType.STR, _spf_helo, "SPF result for the HELO identity"),
    _view("dmarc", FactType.STR, _dmarc, "DMARC result: pass, fail, none, temperror or permerror"),
    _view(
        "dmarc_policy",
        FactType.STR,
        _dmarc_policy,
        "policy the From domain asks for (none, quarantine, reject; after sp= and pct=), "
        "'' without a record",
    ),
    _view(
        "dmarc_aligned",
        FactType.BOOL,
        _dmarc_aligned,
        "an aligned DKIM or SPF pass exists for the From domain",
    ),
    _view("arc", FactType.STR, _arc, "ARC chain validation (cv): pass, fail, none, temperror"),
    _view(
        "from_domain",
        FactType.STR,
        _from_domain,
        "domain of the RFC5322.From address ('' when missing or ambiguous)",
    ),
)
