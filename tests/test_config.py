"""Configuration: TOML -> frozen Settings; every error names file, key and reason."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path

import pytest

from relay.config import Settings, load_settings, parse_hostport, settings_from_mapping
from relay.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_shipped_config_loads_with_loopback_defaults() -> None:
    s = load_settings(REPO / "config" / "relay.toml")
    assert s.smtp.listen == ("127.0.0.1", 2525)
    assert s.delivery.mode == "maildir"
    assert s.metrics.listen == ("127.0.0.1", 9325)
    assert s.policy.path == Path("config/policy.toml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.smtp.max_recipients = 5  # type: ignore[misc]


def test_values_are_parsed_and_validated() -> None:
    s = settings_from_mapping(
        {
            "smtp": {"listen": "[::1]:2600", "command_timeout": 10},
            "relay": {"domains": ["Example.ORG.", "bücher.example"], "networks": ["10.1.2.0/24"]},
            "delivery": {"mode": "smtp", "downstream": "127.0.0.1:10026"},
            "dns": {"nameservers": ["127.0.0.1:5353", "127.0.0.2"]},
            "policy": {"path": ""},
        }
    )
    assert s.smtp.listen == ("::1", 2600)
    assert s.smtp.command_timeout == 10.0
    assert s.relay.domains == ("example.org", "xn--bcher-kva.example")
    assert s.relay.networks == (ipaddress.ip_network("10.1.2.0/24"),)
    assert s.delivery.downstream == ("127.0.0.1", 10026)
    assert s.dns.nameservers == (("127.0.0.1", 5353), ("127.0.0.2", 53))
    assert s.policy.path is None


@pytest.mark.parametrize(
    ("doc", "key", "reason"),
    [
        ({"smtp": {"max_recipients": "many"}}, "smtp.max_recipients", "must be int"),
        ({"smtp": {"max_recipients": 0}}, "smtp.max_recipients", "at least 1"),
        ({"smtp": {"max_recipents": 5}}, "smtp.max_recipents", "unknown key"),
        ({"smpt": {}}, "smpt", "unknown section"),
        ({"smtp": {"listen": "127.0.0.1"}}, "smtp.listen", "no port"),
        ({"smtp": {"listen": "127.0.0.1:99999"}}, "smtp.listen", "out of range"),
        ({"smtp": {"data_timeout": -1}}, "smtp.data_timeout", "greater than 0"),
        ({"relay": {"networks": ["10.0.0.0/33"]}}, "relay.networks", ""),
        ({"relay": {"domains": ["user@example.org"]}}, "relay.domains", "invalid domain"),
        ({"delivery": {"mode": "carrier-pigeon"}}, "delivery.mode", "must be one of"),
        ({"auth": {"enabled": "yes"}}, "auth.enabled", "must be bool"),
        ({"smtp": "nope"}, "smtp", "must be a table"),
    ],
)
def test_errors_name_key_and_reason(doc: dict[str, object], key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        settings_from_mapping(doc, "relay.toml")
    assert err.value.path == "relay.toml"
    assert err.value.key == key
    assert reason in err.value.reason
    assert str(err.value).startswith(f"relay.toml: {key}: ")


@pytest.mark.parametrize(
    "key_file",
    ["q/relay.key", "q", "q/sub/../relay.key", "./q/x/relay.key", "link/relay.key"],
)
def test_the_key_file_must_be_outside_the_quarantine(tmp_path: Path, key_file: str) -> None:
    """Issue 15: whoever may edit quarantine entries must not read the key sealing them
    (``..`` and symlinks resolved)."""
    (tmp_path / "q").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "q")
    doc = {
        "quarantine": {"path": str(tmp_path / "q")},
        "security": {"key_file": str(tmp_path / key_file)},
    }
    with pytest.raises(ConfigError) as err:
        settings_from_mapping(doc, "relay.toml")
    assert err.value.key == "security.key_file"
    assert "outside the quarantine folder" in err.value.reason


def test_the_key_file_beside_the_quarantine_is_accepted(tmp_path: Path) -> None:
    doc = {
        "quarantine": {"path": str(tmp_path / "var" / "quarantine")},
        "security": {"key_file": str(tmp_path / "var" / "quarantine.key")},  # a sibling
    }
    assert settings_from_mapping(doc).security.key_file == tmp_path / "var" / "quarantine.key"
    shipped = load_settings(REPO / "config" / "relay.toml")
    assert shipped.security.key_file == Path("var/relay.key")


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_settings(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[smtp\nlisten=1")
    with pytest.raises(ConfigError, match=r"bad\.toml: invalid TOML"):
        load_settings(bad)


def test_parse_hostport() -> None:
    assert parse_hostport("[2001:db8::1]:25") == ("2001:db8::1", 25)
    assert parse_hostport("mx.example:2525") == ("mx.example", 2525)
    with pytest.raises(ValueError):
        parse_hostport(":25")


def test_every_key_is_in_the_configuration_reference() -> None:
    doc = (REPO / "docs" / "configuration.md").read_text()
    for section in dataclasses.fields(Settings):
        if section.name == "source":
            continue
        assert f"## [{section.name}]" in doc
        cls = type(getattr(Settings(), section.name))
        for key in dataclasses.fields(cls):
            assert f"`{key.name}`" in doc, f"[{section.name}] {key.name} is undocumented"
