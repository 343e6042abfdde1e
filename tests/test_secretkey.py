"""The relay's secret key file: created private when missing, refused when others may read
it, never shown (secretkey.py)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from relay import secretkey
from relay.errors import ConfigError
from relay.secretkey import KEY_BYTES, SecretKey, load_key
from tests.support.relay import make_settings, running_relay


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_missing_key_file_is_created_owner_only(tmp_path: Path, umask_022: None) -> None:
    path = tmp_path / "var" / "relay.key"
    key = load_key(path, create=True)
    assert _mode(path) == 0o600
    assert path.read_bytes() == key.material and len(key.material) == KEY_BYTES
    assert [p.name for p in path.parent.iterdir()] == ["relay.key"]  # no temporary file left behind
    again = load_key(path, create=True)  # an existing key is read, never replaced
    assert again.material == key.material


def test_creation_never_replaces_a_key_another_process_made(tmp_path: Path) -> None:
    """Two workers starting together: the one that links second keeps the first's key."""
    path = tmp_path / "relay.key"
    first = load_key(path, create=True)
    secretkey._create(path)  # the slower worker, which found no file a moment before
    assert load_key(path).material == first.material
    assert [p.name for p in tmp_path.iterdir()] == ["relay.key"]


def test_tools_never_create_the_key(tmp_path: Path) -> None:
    path = tmp_path / "relay.key"
    with pytest.raises(ConfigError, match="does not exist"):
        load_key(path)
    assert not path.exists()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o644])
def test_a_key_others_may_read_or_write_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "relay.key"
    key = load_key(path, create=True)
    path.chmod(mode)
    with pytest.raises(ConfigError, match="open to group or others") as err:
        load_key(path, create=True)
    assert f"{mode:04o}" in str(err.value) and "chmod 600" in str(err.value)
    assert key.material.hex() not in str(err.value) and repr(key.material) not in str(err.value)
    assert _mode(path) == mode  # refused, not silently tightened


@pytest.mark.parametrize(("size", "said"), [(0, "0"), (31, "31"), (5000, "more than 4096")])
def test_a_key_file_of_the_wrong_size_is_refused(tmp_path: Path, size: int, said: str) -> None:
    path = tmp_path / "relay.key"
    path.write_bytes(b"k" * size)
    path.chmod(0o600)
    with pytest.raises(ConfigError, match=f"holds {said} bytes"):
        load_key(path)


def test_a_directory_is_not_a_key_file(tmp_path: Path) -> None:
    path = tmp_path / "relay.key"
    path.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_key(path)


def test_the_key_is_never_shown_and_purposes_get_their_own_subkeys() -> None:
    key = SecretKey(bytes(range(32)))
    assert key.material.hex() not in repr(key) and "material" not in repr(key)
    assert key.derive("state address hash") != key.derive("quarantine seal")
    assert key.derive("quarantine seal") == SecretKey(bytes(range(32))).derive("quarantine seal")
    assert key.derive("quarantine seal") != SecretKey.generate().derive("quarantine seal")
    with pytest.raises(ValueError):
        SecretKey(b"short")


async def test_the_relay_creates_its_key_and_refuses_a_readable_one(
    tmp_path: Path, umask_022: None
) -> None:
    settings = make_settings(tmp_path)
    async with running_relay(settings):
        pass
    key_file = settings.security.key_file
    assert _mode(key_file) == 0o600
    key_file.chmod(0o644)
    with pytest.raises(ConfigError, match="open to group or others"):
        async with running_relay(settings):
            pass
