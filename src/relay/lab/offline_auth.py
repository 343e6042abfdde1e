"""Offline authentication for the lab: results a trusted upstream recorded, or "none".

Replaying a corpus cannot redo SPF (the connecting IP and the DNS of the time are gone)
and live DNS would judge old DKIM keys that have since rotated. So by default the lab
replaces the one DNS-backed fact every authentication fact is a view of,
``auth_results``, with one that reads the message's own Authentication-Results fields
(RFC 8601) whose authserv-id the operator trusts, and says "none" for every method no
trusted field recorded. The fact keeps its name, type, tier and shape (AuthResults), so
``spf``, ``dkim_result``, ``dmarc``, ``dmarc_aligned``, ``dmarc_policy``, ``arc``,
``from_domain`` ... and every policy work unchanged. DKIM key sizes are not recorded in
Authentication-Results, so ``dkim_key_bits`` is 0 offline.

With ``[dns] nameservers`` set (``relay lab --config``) the real checks run instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import authres

from relay.auth.headerscan import scan_headers
from relay.auth.results import (
    ArcResult,
    AuthResults,
    DkimResults,
    DkimSignatureResult,
    DmarcResult,
    SpfResult,
)
from relay.facts.base import FactContext, FactRegistry
from relay.message import Message

AUTH_RESULTS = "auth_results"


@dataclass(frozen=True, slots=True)
class HeaderAuth:
    """Service: which authserv-ids' Authentication-Results fields the lab believes."""

    trusted: frozenset[str]

    def recorded(self, message: Message) -> dict[str, dict[str, str]]:
        """First (topmost) trusted result per method: {method: {"result": .., props..}}."""
        found: dict[str, dict[str, str]] = {}
        for value in message.headers("Authentication-Results"):
            try:
                parsed = authres.AuthenticationResultsHeader.parse_value(value)
            except Exception:  # noqa: S112 - a malformed field is simply not trusted
                continue
            if str(parsed.authserv_id).lower() not in self.trusted:
                continue
            for res in parsed.results:
                method = str(res.method).lower()
                if method not in found:
                    props = {f"{p.type}.{p.name}": str(p.value) for p in res.properties}
                    found[method] = {"result": str(res.result).lower(), **props}
        return found

    def results(self, message: Message) -> AuthResults:
        rec = self.recorded(message)
        dkim, spf, dmarc, arc = (rec.get(m, {}) for m in ("dkim", "spf", "dmarc", "arc"))
        signatures = (
            (
                DkimSignatureResult(
                    index=0,
                    result=dkim["result"],
                    domain=dkim.get("header.d", ""),
                    selector=dkim.get("header.s", ""),
                    algorithm=dkim.get("header.a", ""),
                ),
            )
            if dkim
            else ()
        )
        dmarc_pass = dmarc.get("result") == "pass"
        dkim_pass = dkim.get("result") == "pass"
        mailfrom = spf.get("smtp.mailfrom", "")
        return AuthResults(
            dkim=DkimResults(signatures=signatures, total=len(signatures), note="offline"),
            spf=SpfResult(
                "mailfrom",
                spf.get("result", "none"),
                domain=mailfrom.rpartition("@")[2],
                sender=mailfrom,
            ),
            dmarc=DmarcResult(
                dmarc.get("result", "none"),
                from_domain=dmarc.get("header.from", ""),
                policy=dmarc.get("policy.published-domain-policy", ""),
                # the upstream says aligned, not how: credit DKIM when it passed
                dkim_aligned=dmarc_pass and dkim_pass,
                spf_aligned=dmarc_pass and not dkim_pass,
            ),
            arc=ArcResult(arc.get("result", "none")),
            from_domain=scan_headers(message.header_block, 0).from_domain,
            client_ip=message.peer.ip,
        )


def offline_registry(registry: FactRegistry, auth: HeaderAuth) -> FactRegistry:
    """The registry with ``auth_results`` read from trusted Authentication-Results fields
    (by ``auth``, which needs no service)."""

    async def offline_auth_results(ctx: FactContext) -> dict[str, Any]:
        return auth.results(ctx.message).to_dict()

    return FactRegistry(
        dataclasses.replace(
            s,
            compute=offline_auth_results,
            depends=(),
            needs=(),
            doc=s.doc + " (lab: offline)",
        )
        if s.name == AUTH_RESULTS
        else s
        for s in registry
    )
