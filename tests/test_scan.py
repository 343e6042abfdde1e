"""`relay scan` prints facts and the verdict for one file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from relay.cli.main import main
from tests.support.relay import simple_message


def test_scan_prints_facts_and_verdict_as_json(tmp_path: Path) -> None:
    eml = tmp_path / "m.eml"
    eml.write_bytes(b"From someone  Mon Jan  1 00:00:00 2002\n" + simple_message())
    cfg = tmp_path / "relay.toml"
    cfg.write_text('[model]\nenabled = false\n[policy]\npath = ""\n[auth]\nenabled = false\n')
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "relay.cli",
            "scan",
            str(eml),
            "--config",
            str(cfg),
            "--mail-from",
            "alice@sender.test",
            "--rcpt",
            "bob@example.org",
            "--rcpt",
            "carol@example.org",
            "--client-ip",
            "192.0.2.9",
            "--facts",
            "client_ip,recipient_count,mail_from_domain",
        ],
        capture_output=True,
        timeout=60,
        check=True,
        cwd=tmp_path,
    )
    doc = json.loads(out.stdout)
    assert doc["facts"] == {
        "client_ip": "192.0.2.9",
        "recipient_count": 2,
        "mail_from_domain": "sender.test",
    }
    assert doc["verdict"]["action"] == "accept"
    assert doc["envelope"]["mail_from"] == "alice@sender.test"
    # No key file yet (no relay ran here): the scan reads counts as empty, creates none.
    assert not (tmp_path / "var" / "relay.key").exists()
    assert "state counts read as empty" in out.stderr.decode()


def test_scan_unknown_fact_is_a_clear_error(tmp_path: Path) -> None:
    eml = tmp_path / "m.eml"
    eml.write_bytes(simple_message())
    cfg = tmp_path / "relay.toml"
    cfg.write_text('[model]\nenabled = false\n[policy]\npath = ""\n')
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "relay.cli",
            "scan",
            str(eml),
            "--config",
            str(cfg),
            "--facts",
            "no_such_fact",
        ],
        capture_output=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert out.returncode == 2
    assert "unknown fact 'no_such_fact'" in out.stderr.decode()


def test_scan_of_an_unreadable_path_is_a_clear_error(tmp_path: Path) -> None:
    cfg = tmp_path / "relay.toml"
    cfg.write_text('[model]\nenabled = false\n[policy]\npath = ""\n')
    for target, reason in ((tmp_path / "missing.eml", "No such file"), (tmp_path, "directory")):
        out = subprocess.run(
            [sys.executable, "-m", "relay.cli", "scan", str(target), "--config", str(cfg)],
            capture_output=True,
            timeout=60,
            cwd=tmp_path,
        )
        err = out.stderr.decode()
        assert out.returncode == 2, err
        assert f"relay: cannot read {target}" in err and reason in err
        assert "Traceback" not in err


def test_scan_time_is_the_option_else_the_message_own(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the state store under var/ goes there
    cfg = tmp_path / "relay.toml"
    cfg.write_text('[model]\nenabled = false\n[policy]\npath = ""\n[auth]\nenabled = false\n')
    eml = tmp_path / "m.eml"
    eml.write_bytes(b"Received: by mx; Wed, 7 Aug 2002 05:00:01 +0000\r\n" + simple_message())
    args = ["scan", str(eml), "--config", str(cfg), "--facts", "client_ip"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["time"] == "2002-08-07T05:00:01+00:00"
    assert main([*args, "--time", "2030-01-02T03:04:05+01:00"]) == 0
    assert json.loads(capsys.readouterr().out)["time"] == "2030-01-02T02:04:05+00:00"
    assert main([*args, "--time", "2030-01-02T03:04:05"]) == 0  # no offset: UTC
    assert json.loads(capsys.readouterr().out)["time"] == "2030-01-02T03:04:05+00:00"

    undated = tmp_path / "undated.eml"
    undated.write_bytes(b"From: a@sender.test\r\nSubject: no date\r\n\r\nx\r\n")
    assert main(["scan", str(undated), "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"{undated}: message has no Received or Date" in err and "--time" in err
    assert main(["scan", str(undated), "--config", str(cfg), "--time", "2030-01-02"]) == 0
    assert json.loads(capsys.readouterr().out)["time"] == "2030-01-02T00:00:00+00:00"
