"""`relay model update` run from a timer: --min-new, the registry's update lock, --reload,
and the registry gauges the running relay refreshes on its own."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from relay.cli.main import main
from relay.models.registry import Registry
from tests.test_model_versions import cli_config, mail


def _learn(cfg: Path, folder: Path, label: str, first: int, n: int, rng: random.Random) -> None:
    folder.mkdir(exist_ok=True)
    files = []
    for i in range(first, first + n):
        path = folder / f"{label}-{i}.eml"
        path.write_bytes(mail(i if label == "spam" else 1000 + i, label == "spam", rng))
        files.append(str(path))
    assert main(["learn", f"--{label}", "--config", str(cfg), *files]) == 0


def _versions(cfg: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    capsys.readouterr()
    assert main(["model", "list", "--json", "--config", str(cfg)]) == 0
    return [v["name"] for v in json.loads(capsys.readouterr().out)["versions"]]


def test_min_new_trains_only_when_enough_reports_arrived_since_the_newest_version(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = cli_config(tmp_path)
    rng = random.Random(5)
    _learn(cfg, tmp_path / "in", "spam", 0, 40, rng)
    _learn(cfg, tmp_path / "in", "ham", 0, 40, rng)
    capsys.readouterr()
    update = ["model", "update", "--config", str(cfg)]

    assert main([*update, "--min-new", "81"]) == 0
    assert "80 new reports" in capsys.readouterr().out
    assert _versions(cfg, capsys) == []  # nothing trained

    assert main([*update, "--min-new", "80"]) == 0
    assert "v0001-" in capsys.readouterr().out
    assert len(_versions(cfg, capsys)) == 1

    # The same feedback again: nothing new since v0001's snapshot.
    assert main([*update, "--min-new", "1"]) == 0
    assert "0 new reports" in capsys.readouterr().out
    assert len(_versions(cfg, capsys)) == 1

    _learn(cfg, tmp_path / "in", "spam", 40, 3, rng)
    capsys.readouterr()
    assert main([*update, "--min-new", "4"]) == 0
    assert "3 new reports" in capsys.readouterr().out
    assert main([*update, "--min-new", "3"]) == 0
    assert "v0002-" in capsys.readouterr().out
    assert len(_versions(cfg, capsys)) == 2


def test_an_update_skips_while_another_holds_the_registry_lock(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = cli_config(tmp_path)
    rng = random.Random(6)
    _learn(cfg, tmp_path / "in", "spam", 0, 30, rng)
    _learn(cfg, tmp_path / "in", "ham", 0, 30, rng)
    registry = Registry(tmp_path / "models")
    with registry.update_lock() as held:
        assert held
        with registry.update_lock() as again:
            assert not again  # never waits, never holds twice
        capsys.readouterr()
        assert main(["model", "update", "--config", str(cfg)]) == 0
        assert "skipped" in capsys.readouterr().out
    assert registry.versions() == []
    # Released: the next run trains.
    assert main(["model", "update", "--config", str(cfg)]) == 0
    assert len(registry.versions()) == 1


def test_reload_after_promotion_signals_the_process_in_the_pid_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = cli_config(tmp_path)
    rng = random.Random(7)
    _learn(cfg, tmp_path / "in", "spam", 0, 40, rng)
    _learn(cfg, tmp_path / "in", "ham", 0, 40, rng)
    # A stand-in for the relay: a real process that reports the SIGHUP it waits for.
    waiter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, sys\n"
            "signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGHUP])\n"
            "print('ready', flush=True)\n"
            "signal.sigwait([signal.SIGHUP])\n"
            "print('hup', flush=True)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert waiter.stdout is not None
        assert waiter.stdout.readline().strip() == "ready"
        pidfile = tmp_path / "relay.pid"
        pidfile.write_text(f"{waiter.pid}\n")
        capsys.readouterr()
        args = ["model", "update", "--config", str(cfg), "--promote", "--reload"]
        assert main([*args, "--pidfile", str(pidfile)]) == 0
        assert f"sent SIGHUP to the relay (pid {waiter.pid})" in capsys.readouterr().out
        out, _ = waiter.communicate(timeout=60)
        assert out.strip() == "hup"
    finally:
        if waiter.poll() is None:
            waiter.send_signal(signal.SIGKILL)
            waiter.wait()


def test_min_new_is_a_count(tmp_path: Path) -> None:
    cfg = cli_config(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["model", "update", "--config", str(cfg), "--min-new", "-3"])
    assert exc.value.code == 2


def test_a_running_relay_sees_an_update_made_by_another_process_without_a_reload(
    tmp_path: Path,
) -> None:
    import asyncio

    from prometheus_client import CollectorRegistry

    from relay.models.registry import registry_stats
    from relay.ops.metrics import Metrics

    cfg = cli_config(tmp_path)
    rng = random.Random(8)
    _learn(cfg, tmp_path / "in", "spam", 0, 40, rng)
    _learn(cfg, tmp_path / "in", "ham", 0, 40, rng)
    root = tmp_path / "models"
    prom = CollectorRegistry()
    metrics = Metrics(prom)
    metrics.set_model_versions(registry_stats(root))

    def candidates() -> float | None:
        return prom.get_sample_value("relay_model_updates", {"status": "candidate"})

    assert candidates() == 0

    async def watch() -> None:
        async with metrics.watching_models(lambda: registry_stats(root), every=0.05):
            # The timer's `relay model update`, in another process.
            update = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "relay.cli", "model", "update", "--config", str(cfg)
            )
            assert await update.wait() == 0
            for _ in range(400):
                if candidates() == 1:
                    break
                await asyncio.sleep(0.05)

    asyncio.run(watch())
    assert candidates() == 1
