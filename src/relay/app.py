"""Composition root and lifespan: the only place that builds and tears down resources.

`lifespan(settings)` reads nothing itself: it gets validated Settings, opens services
(DNS resolver, classifier, state store ...), the transport, the policy, the observer and
the SMTP server, yields a Runtime, and on exit stops accepting, drains in-flight sessions
(bounded by smtp.drain_timeout) and closes everything in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing.connection
import os
import signal
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry

from relay.assembly import (
    build_recorder,
    build_stamps,
    build_transport,
    check_services,
    load_decider,
    load_shadow,
    open_sandbox,
    open_services,
)
from relay.config import Settings, load_settings
from relay.contracts import NullObserver, Observer, Transport
from relay.delivery.quarantine import QuarantineStore
from relay.errors import ConfigError, RelayError
from relay.facts import FactRegistry, Services, default_registry
from relay.feedback.learn import BaseScorer, Learner
from relay.feedback.store import open_feedback
from relay.models.holder import ClassifierHolder
from relay.models.registry import current_model_path, registry_stats
from relay.ops.http import MetricsServer, start_metrics_server
from relay.ops.learn import FeedbackMetrics, start_learn_server
from relay.ops.metrics import Metrics
from relay.ops.multiprocess import multiprocess_dir, prepare_multiprocess_dir, worker_exited
from relay.ops.readiness import (
    RelayReadiness,
    SupervisorReadiness,
    describe_classifier,
    describe_model,
)
from relay.ops.shadowlog import ShadowLog
from relay.pipeline.process import Pipeline
from relay.policy import reload_policy
from relay.policy.holder import DeciderHolder
from relay.proc.celsandbox import ConditionSandbox
from relay.secretkey import SecretKey, load_key
from relay.smtp.budget import DataBudget
from relay.smtp.listen import listening_socket, server_tls_context, start_server
from relay.smtp.relaycontrol import RelayControl
from relay.smtp.server import SmtpDeps
from relay.smtp.sessions import Sessions
from relay.smtp.supervisor import Supervisor

log = logging.getLogger("relay")

PID_FILE = Path("var/relay.pid")
METRICS_DIR = Path("var/metrics")  # per-worker metric files when [smtp] workers > 1


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(process)d %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    # aiosmtpd ("mail.log") logs every command with addresses at INFO, DATA lines (bodies)
    # at DEBUG, and at WARNING the client's own words unescaped: "unrecognised: <command>"
    # (ESC or a bare CR included), which is also where the body lines of a refused
    # pipelined DATA land. Only its ERRORs (a bug in aiosmtpd, peer address only) pass; our
    # one line per message and the session-limit lines (client text escaped by
    # smtp/logsafe.printable) replace the rest. A filter that escaped its messages would
    # still log body words, so the level it is.
    logging.getLogger("mail.log").setLevel(logging.ERROR)


def _tls_context(settings: Settings) -> ssl.SSLContext | None:
    cert, key = settings.smtp.tls_cert, settings.smtp.tls_key
    if cert is None or key is None:
        return None
    try:
        return server_tls_context(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(settings.source, "smtp.tls_cert", f"cannot load {cert}: {exc}") from None


@dataclass
class Runtime:
    """What a running relay exposes to its owner (serve(), tests)."""

    settings: Settings
    registry: FactRegistry
    services: Services
    pipeline: Pipeline
    transport: Transport
    sessions: Sessions
    server: asyncio.Server
    observer: Observer
    metrics: MetricsServer | None = None  # the /metrics endpoint this process serves
    sandbox: ConditionSandbox | None = None  # runs conditions with comprehensions
    classifiers: ClassifierHolder | None = None  # the model in force, swapped on reload
    model_metrics: Metrics | None = None  # where model reloads and versions are shown
    _reloads: set[asyncio.Task[bool]] = field(default_factory=set, repr=False)

    @property
    def port(self) -> int:
        return int(self.server.sockets[0].getsockname()[1])

    def reload_policy(self) -> bool:
        """Swap in the policy file's current content; on error keep the old one running."""
        path = self.settings.policy.path
        if path is None:
            log.info("policy reload: no policy file configured")
            return False
        return reload_policy(
            self.pipeline.policy, path, self.registry, self.observer, self.services, self.sandbox
        )

    def reload(self) -> None:
        """SIGHUP: reload the policy, and the model when CURRENT names another file."""
        self.reload_policy()
        if self.classifiers is not None:
            task = asyncio.get_running_loop().create_task(self.reload_model())
            self._reloads.add(task)
            task.add_done_callback(self._reloads.discard)

    async def reload_model(self) -> bool:
        """Open the model ``current_model_path`` names (when it changed) in a new pool and
        swap it in; messages already in the pipeline finish on the old one. On error the
        old model keeps serving. Whether the model changed."""
        holder = self.classifiers
        if holder is None:
            return False
        from relay.classifier.serving import Classifier

        workers = self.settings.model.workers
        try:
            path = current_model_path(self.settings)
            changed = await holder.reload(path, lambda p: Classifier.open(p, workers=workers))
        except RelayError as exc:
            log.error("model reload failed, keeping %s: %s", holder.current.info.version, exc)
            if self.model_metrics is not None:
                self.model_metrics.model_reloaded(ok=False)
            return False
        if changed:
            log.info("model reload: now serving %s", holder.current.info.version)
            if self.model_metrics is not None:
                self.model_metrics.model_reloaded(ok=True)
                self.model_metrics.set_model_info(describe_classifier(holder.current))
        if self.model_metrics is not None:
            self.model_metrics.set_model_versions(
                await asyncio.to_thread(registry_stats, self.settings.model.registry)
            )
        return changed


async def _start_learn(
    settings: Settings,
    stack: contextlib.AsyncExitStack,
    key: SecretKey,
    registry: CollectorRegistry | None,
    scorer: BaseScorer | None = None,
) -> None:
    """The learn endpoint (ops/learn.py) when a token file is set; with several workers
    each binds the port with SO_REUSEPORT, as for SMTP, and writes the one shared store."""
    if settings.feedback.http_token_file is None:
        return
    store = await open_feedback(settings.state, settings.feedback, key)
    stack.push_async_callback(store.close)
    counters = FeedbackMetrics(registry or CollectorRegistry())
    server = await start_learn_server(
        settings.feedback,
        Learner(store, scorer=scorer, authserv_id=settings.authserv_id),
        counters,
        source=settings.source,
        reuse_port=settings.smtp.workers > 1,
    )
    if server is not None:
        stack.push_async_callback(server.close)


@contextlib.asynccontextmanager
async def lifespan(
    settings: Settings,
    *,
    sock: socket.socket | None = None,
    observer: Observer | None = None,
) -> AsyncIterator[Runtime]:
    async with contextlib.AsyncExitStack() as stack:
        registry = default_registry()
        # Created on a fresh machine; refused when others may read it (secretkey.py).
        key = load_key(settings.security.key_file, create=True)
        services = await open_services(settings, stack, key=key)
        classifiers: ClassifierHolder | None = None
        if services.classifier is not None:
            classifiers = ClassifierHolder(services.classifier, Path(services.classifier.info.path))
            stack.push_async_callback(classifiers.close)
        transport = build_transport(settings)
        stack.push_async_callback(transport.close)
        sandbox = open_sandbox(settings, stack)
        holder = DeciderHolder(load_decider(settings, registry, sandbox))
        shadow = load_shadow(settings, registry, sandbox)
        # A policy that reads a fact whose service is off stops start-up (ConfigError).
        check_services(settings, registry, services, [holder.current, *shadow])
        readiness = RelayReadiness(settings, holder, services=services)
        metrics: Metrics | None = None
        metrics_registry: CollectorRegistry | None = None
        endpoint: MetricsServer | None = None
        if observer is None and settings.metrics.enabled:
            metrics_registry = CollectorRegistry()
            metrics = Metrics(metrics_registry)
            await stack.enter_async_context(metrics.flushing())
            model = describe_model(services)
            if model is not None:
                metrics.set_model_info(model)
                stats = await asyncio.to_thread(registry_stats, settings.model.registry)
                metrics.set_model_versions(stats)
            if multiprocess_dir() is None:  # with several workers the supervisor serves it
                endpoint = await start_metrics_server(
                    settings.metrics, metrics_registry, readiness, source=settings.source
                )
                stack.push_async_callback(endpoint.close)
        # Each report keeps the base model's score, for model updates (docs/classifier.md).
        scorer: BaseScorer | None = None
        if classifiers is not None:
            in_force = classifiers

            async def scorer(raw: bytes) -> tuple[str, float]:
                return await in_force.current.base_score(raw)

        await _start_learn(settings, stack, key, metrics_registry if metrics else None, scorer)
        observer = observer or metrics or NullObserver()
        if settings.policy.shadow_log is not None:
            shadow_log = ShadowLog(settings.policy.shadow_log, inner=observer)
            stack.callback(shadow_log.close)
            observer = shadow_log
        quarantine = QuarantineStore(settings.quarantine.path, key=key)
        swept = quarantine.sweep_stale()
        if swept:
            log.warning("quarantine: removed %d half-written entries left by a crash", swept)
        pipeline = Pipeline(
            registry=registry,
            services=services,
            policy=holder,
            observer=observer,
            stamps=build_stamps(settings, services),
            quarantine=quarantine,
            shadow=shadow,
            hostname=settings.smtp.hostname,
            recorder=build_recorder(settings, services),
            classifiers=classifiers,
        )
        sessions = Sessions(
            limit=settings.smtp.max_connections,
            data_budget=DataBudget.from_settings(settings.smtp),
        )
        deps = SmtpDeps(
            settings=settings,
            pipeline=pipeline,
            transport=transport,
            control=RelayControl(settings.relay.domains, settings.relay.networks),
            sessions=sessions,
            observer=observer,
            tls_context=_tls_context(settings),
        )
        if sock is None:
            host, port = settings.smtp.listen
            try:
                sock = listening_socket(host, port, reuse_port=settings.smtp.workers > 1)
            except OSError as exc:
                raise ConfigError(
                    settings.source,
                    "smtp.listen",
                    f"cannot listen on {host}:{port}: {exc.strerror}",
                ) from None
        server = await start_server(deps, sock)
        readiness.server = server
        runtime = Runtime(
            settings=settings,
            registry=registry,
            services=services,
            pipeline=pipeline,
            transport=transport,
            sessions=sessions,
            server=server,
            observer=observer,
            metrics=endpoint,
            sandbox=sandbox,
            classifiers=classifiers,
            model_metrics=metrics,
        )
        try:
            yield runtime
        finally:
            server.close()  # stop accepting first
            await sessions.drain(settings.smtp.drain_timeout)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), timeout=2.0)


async def run(settings: Settings, on_ready: Callable[[], None] | None = None) -> None:
    """Serve until SIGTERM/SIGINT; SIGHUP reloads the policy and the model version."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    async with lifespan(settings) as runtime:
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, runtime.reload)
        host, _ = settings.smtp.listen
        log.info("relay listening on %s:%d (pid %d)", host, runtime.port, os.getpid())
        # Everything loaded at start-up (model, policy, suffix list) lives for the whole
        # run: freezing it keeps full garbage collections from walking it, which measured
        # as loop stalls of ~15 ms without and < 1 ms with (bench/results/auth.md).
        gc.freeze()
        if on_ready is not None:
            on_ready()
        await stop.wait()
        log.info("shutting down: draining sessions (up to %.0fs)", settings.smtp.drain_timeout)
    log.info("stopped")


def worker_main(config_path: str, index: int, ready: multiprocessing.connection.Connection) -> None:
    """Entry point of one worker process (spawned, so it imports everything afresh); the
    supervisor is handed this function, so the SMTP layer never imports the app."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor owns Ctrl-C
    settings = load_settings(Path(config_path))
    configure_logging(settings.log.level)
    try:
        asyncio.run(run(settings, on_ready=lambda: ready.send(os.getpid())))
    except RelayError as exc:
        logging.getLogger("relay").error("worker %d: %s", index, exc)
        raise SystemExit(2) from None


async def supervise(config_path: Path, settings: Settings) -> int:
    """Several workers: each writes its metrics to files under var/metrics (the variable is
    set before any worker is spawned, see relay.metrics) and the supervisor serves the one
    endpoint that adds them up."""
    supervisor = Supervisor(config_path, settings, worker_main, on_worker_exit=worker_exited)
    if not settings.metrics.enabled:
        return await supervisor.run()
    prepare_multiprocess_dir(METRICS_DIR)

    def workers_ready() -> bool:
        workers = supervisor.workers.values()
        return len(workers) == settings.smtp.workers and all(w.was_ready for w in workers)

    endpoint = await start_metrics_server(
        settings.metrics,
        CollectorRegistry(),
        SupervisorReadiness(settings, workers_ready),
        source=settings.source,
    )
    try:
        return await supervisor.run()
    finally:
        await endpoint.close()


def serve(config_path: Path) -> int:
    try:
        settings = load_settings(config_path)
    except ConfigError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log.level)
    PID_FILE.parent.mkdir(parents=True, exist_ok=True)
    PID_FILE.write_text(f"{os.getpid()}\n")
    try:
        if settings.smtp.workers > 1:
            return asyncio.run(supervise(config_path, settings))
        asyncio.run(run(settings))
    except RelayError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    finally:
        with contextlib.suppress(FileNotFoundError):
            PID_FILE.unlink()
    return 0
