"""Organisational domains (RFC 7489 3.2) from the shipped Public Suffix List."""

from __future__ import annotations

import pytest
from publicsuffixlist import PublicSuffixList

from relay.auth import domains
from relay.auth.domains import OrgDomains, normalise_domain


@pytest.fixture(scope="module")
def psl() -> PublicSuffixList:
    return PublicSuffixList(accept_unknown=True)


def test_org_domain_and_alignment(psl: PublicSuffixList) -> None:
    orgs = OrgDomains(psl)
    assert orgs.org_domain("mail.example.co.uk") == "example.co.uk"
    assert orgs.org_domain("a.b.example.com") == "example.com"
    assert orgs.org_domain("co.uk") == "co.uk"  # a public suffix is its own answer
    assert orgs.org_domain("") == ""
    assert orgs.aligned("mail.example.com", "example.com", "r")
    assert not orgs.aligned("mail.example.com", "example.com", "s")
    assert not orgs.aligned("example.co.uk", "other.co.uk", "r")


def test_recent_answers_are_bounded_and_still_right(
    psl: PublicSuffixList, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(domains, "RECENT_SIZE", 8)
    orgs = OrgDomains(psl)
    for i in range(50):
        assert orgs.org_domain(f"host{i}.example{i % 3}.co.uk") == f"example{i % 3}.co.uk"
        assert len(orgs._recent) <= 8
    assert orgs.org_domain("host1.example1.co.uk") == "example1.co.uk"  # again, cached or not


def test_normalise_domain() -> None:
    assert normalise_domain(" Example.COM. ") == "example.com"
    assert normalise_domain("bücher.example") == "xn--bcher-kva.example"
    with pytest.raises(ValueError):
        normalise_domain("a..b")
