"""DMARC (RFC 7489): policy discovery, identifier alignment and the policy to apply.

No maintained Python library does DMARC evaluation over an async resolver (checkdmarc
checks a domain's records, with its own blocking DNS; authheaders downloads its suffix
list), so the steps are written out here, small and in RFC order. The tag-value syntax is
DKIM's (RFC 7489 6.4), so records are parsed with dkimpy's parser, and the organisational
domain comes from the ``publicsuffixlist`` package.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from functools import lru_cache

from relay.auth.domains import OrgDomains
from relay.auth.results import DkimResults, DmarcResult, SpfResult
from relay.auth.tagvalue import TagListError, parse_tag_value
from relay.dns import DnsTemporaryError, Resolver

POLICIES = ("none", "quarantine", "reject")


@dataclass(frozen=True, slots=True)
class DmarcRecord:
    domain: str  # where it was found
    p: str
    sp: str
    adkim: str
    aspf: str
    pct: int


@dataclass(frozen=True, slots=True)
class Discovery:
    """What policy discovery found: a record, or a final result (none/temperror/permerror)."""

    from_domain: str
    org_domain: str
    record: DmarcRecord | None = None
    result: DmarcResult | None = None


def parse_record(text: bytes, domain: str) -> DmarcRecord | str:
    """A record, or why it is unusable (RFC 7489 6.3)."""
    try:
        tags = parse_tag_value(text)
    except TagListError:
        return "malformed DMARC record"
    if next(iter(tags), None) != b"v" or tags.get(b"v") != b"DMARC1":
        return "v=DMARC1 is not the first tag"
    p = tags.get(b"p", b"").decode("ascii", "replace").lower()
    if p not in POLICIES:
        # 6.3: an invalid p= with a rua= is treated as p=none, otherwise no DMARC
        if tags.get(b"rua"):
            p = "none"
        else:
            return "missing or invalid p="
    sp = tags.get(b"sp", b"").decode("ascii", "replace").lower()
    if sp not in POLICIES:
        sp = p
    adkim = tags.get(b"adkim", b"r").decode("ascii", "replace").lower()
    aspf = tags.get(b"aspf", b"r").decode("ascii", "replace").lower()
    pct_text = tags.get(b"pct", b"100")
    pct = int(pct_text) if pct_text.isdigit() and int(pct_text) <= 100 else 100
    return DmarcRecord(
        domain=domain,
        p=p,
        sp=sp,
        adkim=adkim if adkim in ("r", "s") else "r",
        aspf=aspf if aspf in ("r", "s") else "r",
        pct=pct,
    )


def _choose(records: list[bytes], domain: str) -> DmarcRecord | str | None:
    """The one DMARC record among a name's TXT records; None when there is none; str
    when unusable."""
    found = [r for r in records if r.startswith(b"v=DMARC1")]
    if not found:
        return None
    if len(found) > 1:
        return "more than one DMARC record"
    return _parsed(found[0], domain)


@lru_cache(maxsize=4096)
def _parsed(text: bytes, domain: str) -> DmarcRecord | str:
    """``parse_record`` once per distinct record (both are immutable)."""
    return parse_record(text, domain)


async def _lookup(resolver: Resolver, domain: str) -> DmarcRecord | str | None:
    return _choose(await resolver.txt(f"_dmarc.{domain}"), domain)


def _outcome(from_domain: str, org: str, found: DmarcRecord | str | None) -> Discovery:
    if found is None:
        return Discovery(
            from_domain, org, result=DmarcResult("none", from_domain, org, reason="no record")
        )
    if isinstance(found, str):
        return Discovery(
            from_domain, org, result=DmarcResult("permerror", from_domain, org, reason=found)
        )
    return Discovery(from_domain, org, record=found)


def _no_from(from_error: str) -> Discovery:
    return Discovery("", "", result=DmarcResult("permerror", reason=from_error))


def discover_cached(
    resolver: Resolver, orgs: OrgDomains, from_domain: str, from_error: str
) -> Discovery | None:
    """``discover`` from the resolver's cache alone, without waiting; None when an answer
    it needs is not cached (then await ``discover``)."""
    if from_error:
        return _no_from(from_error)
    org = orgs.org_domain(from_domain)
    records = resolver.peek_txt(f"_dmarc.{from_domain}")
    if records is None:
        return None
    found = _choose(records, from_domain)
    if found is None and org != from_domain:
        records = resolver.peek_txt(f"_dmarc.{org}")
        if records is None:
            return None
        found = _choose(records, org)
    return _outcome(from_domain, org, found)


async def discover(
    resolver: Resolver, orgs: OrgDomains, from_domain: str, from_error: str
) -> Discovery:
    """Policy discovery (RFC 7489 6.6.3): the From domain, then its organisational domain."""
    if from_error:
        return _no_from(from_error)
    org = orgs.org_domain(from_domain)
    try:
        found = await _lookup(resolver, from_domain)
        if found is None and org != from_domain:
            found = await _lookup(resolver, org)
    except DnsTemporaryError as exc:
        return Discovery(
            from_domain, org, result=DmarcResult("temperror", from_domain, org, reason=str(exc))
        )
    return _outcome(from_domain, org, found)


def _in_sample(pct: int, sample_key: bytes) -> bool:
    """pct= sampling that gives the same answer for the same message on every replay."""
    if pct >= 100:
        return True
    return int.from_bytes(hashlib.sha256(sample_key).digest()[:4], "big") % 100 < pct


def _alignment(
    orgs: OrgDomains, from_domain: str, dkim: DkimResults, spf: SpfResult, adkim: str, aspf: str
) -> tuple[str, bool]:
    """(the first aligned passing DKIM domain or "", whether SPF passed aligned)."""
    dkim_domain = next(
        (s.domain for s in dkim.passing if orgs.aligned(s.domain, from_domain, adkim)), ""
    )
    return dkim_domain, spf.result == "pass" and orgs.aligned(spf.domain, from_domain, aspf)


def evaluate(
    found: Discovery,
    orgs: OrgDomains,
    dkim: DkimResults,
    spf: SpfResult,
    sample_key: bytes,
) -> DmarcResult:
    if found.result is not None:
        if not found.from_domain:
            return found.result
        # No usable record: still say whether the From domain is authenticated (relaxed
        # alignment, the RFC 7489 default), which some regimes ask for without DMARC.
        dkim_domain, spf_aligned = _alignment(orgs, found.from_domain, dkim, spf, "r", "r")
        return replace(
            found.result,
            dkim_aligned=bool(dkim_domain),
            spf_aligned=spf_aligned,
            dkim_domain=dkim_domain,
        )
    record = found.record
    assert record is not None
    from_domain = found.from_domain
    dkim_domain, spf_aligned = _alignment(orgs, from_domain, dkim, spf, record.adkim, record.aspf)
    aligned = bool(dkim_domain) or spf_aligned
    if aligned:
        result, reason = "pass", ""
    else:
        spf_temp = spf.result == "temperror" and orgs.aligned(spf.domain, from_domain, record.aspf)
        temp = spf_temp or any(
            s.result == "temperror" and orgs.aligned(s.domain, from_domain, record.adkim)
            for s in dkim.signatures
        )
        result = "temperror" if temp else "fail"
        reason = "an aligned check could not complete" if temp else "no aligned pass"
    subdomain = record.domain != from_domain
    published = record.sp if subdomain else record.p
    policy = published
    sampled_out = not _in_sample(record.pct, sample_key)
    if sampled_out:  # 6.6.4: outside the sample, apply the next less strict policy
        policy = POLICIES[max(POLICIES.index(published) - 1, 0)]
    return DmarcResult(
        result=result,
        from_domain=from_domain,
        org_domain=found.org_domain,
        record_domain=record.domain,
        policy=policy,
        published_policy=published,
        p=record.p,
        sp=record.sp,
        pct=record.pct,
        sampled_out=sampled_out,
        adkim=record.adkim,
        aspf=record.aspf,
        dkim_aligned=bool(dkim_domain),
        spf_aligned=spf_aligned,
        dkim_domain=dkim_domain,
        reason=reason,
    )
