"""[greylist] and [ratelimit]: frozen, validated settings; bad values name the key."""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any

import pytest

from relay.config import GreylistSettings, RateBucket, RateLimitSettings, settings_from_mapping
from relay.errors import ConfigError


def test_defaults() -> None:
    settings = settings_from_mapping({})
    assert settings.greylist == GreylistSettings()
    assert (settings.greylist.delay, settings.greylist.retry_window) == (300.0, 4 * 3600.0)
    assert settings.greylist.lifetime == 36 * 86400.0
    assert settings.ratelimit == RateLimitSettings()


def test_values_are_read_and_normalised() -> None:
    settings = settings_from_mapping(
        {
            "greylist": {
                "enabled": False,
                "delay": 60,
                "retry_window": 600,
                "lifetime": 86400,
                "ipv4_prefix": 32,
                "ipv6_prefix": 48,
                "auto_allow_after": 0,
                "exempt_networks": ["192.0.2.7/24"],
                "exempt_dmarc_pass": False,
                "exempt_sender_domains": ["Bücher.Example.", ".Bank.example"],
            },
            "ratelimit": {
                "client_ip": {"rate": 0.5, "burst": 2},
                "recipient": {"rate": 0},
                "ipv6_prefix": 56,
                "exempt_networks": ["2001:db8::/32"],
            },
        }
    )
    grey = settings.greylist
    assert (grey.enabled, grey.delay, grey.ipv4_prefix, grey.auto_allow_after) == (
        False,
        60.0,
        32,
        0,
    )
    assert grey.exempt_networks == (ipaddress.ip_network("192.0.2.0/24"),)
    assert grey.exempt_sender_domains == ("xn--bcher-kva.example", ".bank.example")
    rates = settings.ratelimit
    assert rates.client_ip == RateBucket(0.5, 2)
    assert rates.sender_domain == RateLimitSettings().sender_domain
    assert not rates.recipient.enabled and rates.ipv6_prefix == 56
    with pytest.raises(dataclasses.FrozenInstanceError):
        grey.delay = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("data", "key", "reason"),
    [
        ({"greylist": {"delay": 0}}, "greylist.delay", "greater than 0"),
        ({"greylist": {"delay": "5m"}}, "greylist.delay", "must be float"),
        ({"greylist": {"retry_window": -1}}, "greylist.retry_window", "greater than 0"),
        ({"greylist": {"lifetime": 100}}, "greylist.lifetime", "delay + retry_window"),
        ({"greylist": {"ipv4_prefix": 33}}, "greylist.ipv4_prefix", "between 8 and 32"),
        ({"greylist": {"ipv6_prefix": 0}}, "greylist.ipv6_prefix", "between 8 and 128"),
        ({"greylist": {"auto_allow_after": -1}}, "greylist.auto_allow_after", "0 (never)"),
        ({"greylist": {"exempt_networks": ["nope"]}}, "greylist.exempt_networks", "nope"),
        (
            {"greylist": {"exempt_sender_domains": ["a b.example"]}},
            "greylist.exempt_sender_domains",
            "invalid domain",
        ),
        ({"greylist": {"dealy": 5}}, "greylist.dealy", "unknown key"),
        ({"greylist": []}, "greylist", "must be a table"),
        ({"ratelimit": {"client_ip": 5}}, "ratelimit.client_ip", "must be a table"),
        ({"ratelimit": {"client_ip": {"rate": -1}}}, "ratelimit.client_ip.rate", "0 (off)"),
        (
            {"ratelimit": {"client_ip": {"rate": float("nan")}}},
            "ratelimit.client_ip.rate",
            "0 (off)",
        ),
        ({"ratelimit": {"recipient": {"burst": 0}}}, "ratelimit.recipient.burst", "at least 1"),
        ({"ratelimit": {"recipient": {"burst": 1.5}}}, "ratelimit.recipient.burst", "int"),
        ({"ratelimit": {"sender": {"rate": 1}}}, "ratelimit.sender", "unknown key"),
        ({"ratelimit": {"client_ip": {"rat": 1}}}, "ratelimit.client_ip.rat", "unknown key"),
        ({"ratelimit": {"ipv6_prefix": 129}}, "ratelimit.ipv6_prefix", "between 8 and 128"),
    ],
)
def test_bad_values_name_the_key(data: dict[str, Any], key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        settings_from_mapping(data, "relay.toml")
    assert err.value.key == key
    assert reason in str(err.value)
