"""A relay worker loads only what its configuration uses: the redis package (7 MiB of RSS
a worker, issue 17) stays out with the SQLite backend, the default."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.support.relay import free_port
from tests.test_lifecycle import write_config

# Runs in a fresh interpreter (this test process has long imported everything): the
# worker's whole start-up (config, lifespan: state store, feedback store, learn endpoint),
# then what it holds; afterwards a Redis store is built (never connected), which must load
# redis, so the check is shown to see the package when it is there.
_PROBE = textwrap.dedent(
    """
    import asyncio, json, sys
    from pathlib import Path
    from relay.app import lifespan
    from relay.config import load_settings
    from relay.secretkey import load_key
    from relay.state import RedisState

    def loaded():
        return sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] == "redis"})

    async def main():
        settings = load_settings(Path(sys.argv[1]))
        async with lifespan(settings):
            serving = loaded()
        key = load_key(settings.security.key_file, create=True)
        store = RedisState("redis://127.0.0.1:1/0", key=key)
        await store.close()
        print(json.dumps({"serving": serving, "with_redis_store": loaded()}))

    asyncio.run(main())
    """
)


def test_a_worker_with_the_sqlite_backend_never_imports_redis(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, free_port())
    token = tmp_path / "learn.token"
    token.write_text("t" * 32)
    token.chmod(0o600)
    # The learn endpoint opens the feedback store too (feedback/store.py imported redis).
    cfg.write_text(
        cfg.read_text()
        + f'[feedback]\nhttp_listen = "127.0.0.1:{free_port()}"\n'
        + f'http_token_file = "{token}"\n'
        + f'[security]\nkey_file = "{tmp_path / "relay.key"}"\n'
    )
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(cfg)],
        cwd=tmp_path,
        capture_output=True,
        timeout=120,
        check=True,
    )
    found = json.loads(out.stdout.decode().splitlines()[-1])
    assert found == {"serving": [], "with_redis_store": ["redis"]}, out.stderr.decode()[-2000:]
