"""Domain names as DMARC compares them: normalised, and their organisational domain.

The organisational domain (RFC 7489 3.2) comes from the Public Suffix List shipped inside
the ``publicsuffixlist`` package: never downloaded at run time, updated with the package.
"""

from __future__ import annotations

from publicsuffixlist import PublicSuffixList

from relay.idn import to_alabel

RECENT_SIZE = 4096  # organisational-domain answers kept per OrgDomains


def normalise_domain(text: str) -> str:
    """Lower-case A-label form without the trailing dot; "" stays ""; ValueError if invalid.
    Non-ASCII names are converted by ``idn.to_alabel`` (IDNA 2008, no mapping)."""
    domain = text.strip().rstrip(".").lower()
    if not domain:
        return ""
    if not domain.isascii():
        # IDNA 2008 without mapping, as everywhere in the relay (idn.py). ASCII names stay
        # lenient (an underscore or a long label in a From domain is not a crash).
        try:
            domain = to_alabel(domain)
        except ValueError as exc:
            raise ValueError(f"invalid domain {text!r}") from exc
    labels = domain.split(".")
    if len(domain) > 253 or any(not label or len(label) > 63 for label in labels):
        raise ValueError(f"invalid domain {text!r}")
    return domain


def org_domain(psl: PublicSuffixList, domain: str) -> str:
    """The organisational (registrable) domain: mail.example.co.uk -> example.co.uk; the
    domain itself when it is a public suffix or empty. The one definition: DMARC alignment
    (OrgDomains) and the header and bulk facts all use it."""
    domain = domain.strip().rstrip(".").lower()
    if not domain:
        return ""
    found = psl.privatesuffix(domain)
    return str(found) if found else domain


class OrgDomains:
    """Organisational-domain lookups; build once (parsing the list takes ~0.1 s)."""

    def __init__(self, psl: PublicSuffixList | None = None) -> None:
        # accept_unknown (the default): an unlisted TLD is a public suffix, as RFC 7489 wants
        self._psl = psl or PublicSuffixList(accept_unknown=True)
        # recent answers (a list lookup is ~10 us; a message asks two to four times)
        self._recent: dict[str, str] = {}

    def org_domain(self, domain: str) -> str:
        """The registrable domain of ``domain`` (itself when it is a public suffix)."""
        if not domain:
            return ""
        org = self._recent.get(domain)
        if org is None:
            org = org_domain(self._psl, domain)
            if len(self._recent) >= RECENT_SIZE:
                del self._recent[next(iter(self._recent))]  # oldest first: bounded memory
            self._recent[domain] = org
        return org

    def aligned(self, a: str, b: str, mode: str) -> bool:
        """Identifier alignment (RFC 7489 3.1): strict = equal, relaxed = same org domain."""
        if not a or not b:
            return False
        if a == b:
            return True
        return mode != "s" and self.org_domain(a) == self.org_domain(b)
