"""A relay worker loads only what its configuration uses: the redis package (7 MiB of RSS
a worker, issue 17) stays out with the SQLite backend, the default."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.support.relay import free_port
from tests.test_lifecycle import write_config

MODEL = Path(__file__).resolve().parents[1] / "models" / "spam.skops"


def _probe(script: str, arg: Path, cwd: Path) -> tuple[Any, str]:
    """Runs ``script`` in a fresh interpreter (nothing imported yet) with ``arg``: the JSON
    it prints last, and its stderr's tail for the assertion message."""
    out = subprocess.run(
        [sys.executable, "-c", script, str(arg)],
        cwd=cwd,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    return json.loads(out.stdout.decode().splitlines()[-1]), out.stderr.decode()[-2000:]


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
    found, err = _probe(_PROBE, cfg, tmp_path)
    assert found == {"serving": [], "with_redis_store": ["redis"]}, err


# The same probe for the verifier's libraries: with verification in child processes
# (``[auth] workers`` > 0, the default) the worker only encodes requests (auth/wire.py);
# dkimpy, PyNaCl and cryptography (~8 MiB of RSS a worker) are the children's. Then an
# authenticator that verifies in a thread is built here, which must load them.
_AUTH_PROBE = textwrap.dedent(
    """
    import asyncio, json, sys
    from pathlib import Path
    from relay.app import lifespan
    from relay.auth.checker import Authenticator
    from relay.config import load_settings

    WATCHED = {"cryptography", "dkim", "nacl"}

    def loaded():
        return sorted({m.split(".")[0] for m in sys.modules} & WATCHED)

    async def main():
        settings = load_settings(Path(sys.argv[1]))
        async with lifespan(settings) as runtime:
            serving = loaded()
            children = len(runtime.services.authenticator.pids)
        in_thread = Authenticator(None, processes=0)
        await in_thread.close()
        print(json.dumps({"serving": serving, "children": children, "in_thread": loaded()}))

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("model", [True, False], ids=["analysis child", "verification child"])
def test_a_worker_verifying_in_children_never_imports_the_verifier(
    tmp_path: Path, model: bool
) -> None:
    cfg = write_config(tmp_path, free_port())
    text = cfg.read_text().replace("[auth]\nenabled = false\n", "[auth]\nworkers = 1\n")
    if model:  # the default: one relay.analysis child classifies and verifies
        text = text.replace(
            "[model]\nenabled = false\n",
            f'[model]\npath = "{MODEL}"\nregistry = "{tmp_path / "models"}"\n',
        )
    cfg.write_text(text + '[dns]\nnameservers = ["127.0.0.1"]\ntimeout = 1\n')
    found, err = _probe(_AUTH_PROBE, cfg, tmp_path)
    expected = {"serving": [], "children": 1, "in_thread": ["cryptography", "dkim", "nacl"]}
    assert found == expected, err


# A verification child (cryptoproc or analysis) after its start: dkimpy's own resolver
# module, and dnspython with it (3.5 MiB a child), never loads; a signature still verifies
# (its key came with the request), and an ARC chain asking dkimpy's default lookup is
# refused rather than resolved. Then the same import without ``load_offline`` loads dns.
_CHILD_PROBE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from relay.auth.cryptoproc import decode_answer, encode_request, handle, load_offline
    from relay.auth.wire import decode_request

    load_offline()
    raw, keys, limit, arc = decode_request(Path(sys.argv[1]).read_bytes())
    dkim_results, _arc = decode_answer(handle(b"".join(encode_request(raw, keys, limit, arc))))
    try:
        sys.modules["dkim.dnsplug"].get_txt(b"sel._domainkey.example.com")
        lookup = "resolved"
    except RuntimeError:
        lookup = "refused"
    print(json.dumps({
        "results": [s.result for s in dkim_results.signatures],
        "dns": "dns" in sys.modules,
        "lookup": lookup,
    }))
    """
)


def test_a_verification_child_never_loads_a_resolver(tmp_path: Path) -> None:
    from relay.auth.wire import encode_request
    from tests.support.dkimkeys import make_message, rsa_key, sign

    key = rsa_key("example.com", "sel", 1024)
    raw = sign(make_message(body="Shall we meet at noon?\r\n"), key)
    request = tmp_path / "request"
    request.write_bytes(
        b"".join(encode_request(raw, {key.name.encode(): key.txt.encode()}, 10, True))
    )
    found, err = _probe(_CHILD_PROBE, request, tmp_path)
    assert found == {"results": ["pass"], "dns": False, "lookup": "refused"}, err
    plain = subprocess.run(
        [sys.executable, "-c", "import sys, relay.auth.verify; print('dns' in sys.modules)"],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert plain.stdout.decode().split() == ["True"]  # the check sees dnspython when it loads


# The same probe for numpy (with OpenBLAS ~12 MiB of RSS a worker): with the model on (the
# default) the classifier's children compute the bulk fingerprint too, the model registry
# and the feedback store read their files without the model's modules, so a worker that
# started and handled a message through SMTP and the bulk facts holds no numpy. Then the
# in-process fingerprint (the fallback without children) must load it.
_NUMPY_PROBE = textwrap.dedent(
    """
    import asyncio, json, sys
    from pathlib import Path
    from relay.app import lifespan
    from relay.config import load_settings
    from relay.facts.base import Facts
    from relay.message import Message
    from tests.support.postfix import send

    RAW = b"From: a@sender.test\\r\\nTo: bob@example.org\\r\\nSubject: hi\\r\\n\\r\\n" + (
        b"Shall we meet at noon on Friday? " * 20 + b"\\r\\n"
    )

    def loaded():
        return "numpy" in sys.modules

    async def main():
        settings = load_settings(Path(sys.argv[1]))
        async with lifespan(settings) as runtime:
            reply = await send(runtime.port, ["bob@example.org"], RAW, timeout=60)
            message = Message.from_file_bytes(RAW, received_at=1_773_133_200.0)
            facts = Facts(runtime.registry, message, runtime.services)
            keys = await facts.get("bulk_fingerprint")
            serving = loaded()
            children = len(runtime.services.classifier.pids)
        from relay.classifier.minhash import fingerprint
        fingerprint("in process")
        print(json.dumps({"code": reply.code, "keys": len(keys), "children": children,
                          "serving": serving, "in_process": loaded()}))

    asyncio.run(main())
    """
)


def test_a_worker_with_the_model_on_never_imports_numpy(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, free_port())
    policy = Path(__file__).resolve().parents[1] / "config" / "policy.toml"
    text = cfg.read_text().replace("[auth]\nenabled = false\n", "[auth]\nworkers = 1\n")
    text = text.replace(
        "[model]\nenabled = false\n",
        f'[model]\npath = "{MODEL}"\nregistry = "{tmp_path / "models"}"\n',
    )
    text = text.replace('[policy]\npath = ""\n', f'[policy]\npath = "{policy}"\n')
    text = text.replace(
        "[metrics]\nenabled = false\n", f'[metrics]\nlisten = "127.0.0.1:{free_port()}"\n'
    )
    cfg.write_text(text + '[dns]\nnameservers = ["127.0.0.1"]\ntimeout = 1\n')
    repo = Path(__file__).resolve().parents[1]  # tests.support importable from there
    found, err = _probe(_NUMPY_PROBE, cfg, repo)
    expected = {"code": 250, "keys": 4, "children": 1, "serving": False, "in_process": True}
    assert found == expected, err
