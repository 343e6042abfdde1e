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
import os
import signal
import socket
import ssl
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
    open_classifier,
    open_sandbox,
    open_services,
)
from relay.config import Settings, load_settings
from relay.contracts import NullObserver, Observer, Transport
from relay.delivery.quarantine import QuarantineStore
from relay.errors import ConfigError, RelayError, StateError
from relay.facts import FactRegistry, Services, default_registry
from relay.facts.base import FailureKind
from relay.feedback.learn import BaseScorer, Learner
from relay.feedback.store import open_feedback
from relay.logconfig import configure_logging
from relay.milter.server import MilterServer
from relay.milter.session import MilterLimits
from relay.models.holder import ClassifierHolder
from relay.models.registry import current_model_path, registry_stats
from relay.ops.faults import FactFaults
from relay.ops.http import MetricsServer, start_metrics_server
from relay.ops.learn import FeedbackMetrics, start_learn_server
from relay.ops.looplag import watching_loop_lag
from relay.ops.metrics import Metrics
from relay.ops.multiprocess import multiprocess_dir
from relay.ops.readiness import (
    RelayReadiness,
    describe_classifier,
    describe_model,
)
from relay.ops.shadowlog import ShadowLog
from relay.pipeline.process import Pipeline
from relay.policy import reload_policy
from relay.policy.holder import DeciderHolder
from relay.proc.celsandbox import ConditionSandbox
from relay.proc.lifetime import release_free_memory
from relay.secretkey import SecretKey, load_key
from relay.smtp.budget import DataBudget
from relay.smtp.listen import listening_socket, server_tls_context, start_server
from relay.smtp.relaycontrol import RelayControl
from relay.smtp.server import SmtpDeps
from relay.smtp.sessions import Sessions

log = logging.getLogger("relay")


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
    milter: MilterServer | None = None  # the milter door, when [milter] listen is set
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
        try:
            path = current_model_path(self.settings)
            # verification moves to the new children too when it shares them
            authenticator = self.services.authenticator
            changed = await holder.reload(
                path, lambda p: open_classifier(self.settings, p, authenticator)
            )
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
    # Redis down at start is no reason to stay down: the endpoint answers 503 until it is up.
    store = await open_feedback(settings.state, settings.feedback, key, require_answer=False)
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


async def _check_state(services: Services, faults: FactFaults) -> None:
    """The state backend at start-up: one that does not answer is logged and marks the
    relay degraded (until a /readyz probe or the quiet time clears it), never fatal."""
    if services.state is None:
        return
    try:
        async with asyncio.timeout(5.0):
            await services.state.ping()
    except (StateError, TimeoutError) as exc:
        faults.mark(FailureKind.STATE, "state_backend", exc)
        log.warning(
            "state backend does not answer: starting degraded; state-backed facts fail "
            "(relay_fact_errors_total) and mail flows until it answers"
        )


@contextlib.asynccontextmanager
async def lifespan(
    settings: Settings,
    *,
    sock: socket.socket | None = None,
    observer: Observer | None = None,
    smtp: bool = True,
) -> AsyncIterator[Runtime]:
    """``smtp=False`` (``relay milter``): only the milter door listens."""
    async with contextlib.AsyncExitStack() as stack:
        registry = default_registry()
        # Created on a fresh machine; refused when others may read it (secretkey.py).
        key = load_key(settings.security.key_file, create=True)
        # A Redis that does not answer yet does not stop the relay: it starts degraded
        # (state-backed facts fail, counted; mail flows) and uses Redis once it answers.
        services = await open_services(settings, stack, key=key, require_state=False)
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
            await stack.enter_async_context(watching_loop_lag(metrics.loop_lag))
            model = describe_model(services)
            if model is not None:
                metrics.set_model_info(model)
                stats = await asyncio.to_thread(registry_stats, settings.model.registry)
                metrics.set_model_versions(stats)
                root = settings.model.registry
                await stack.enter_async_context(
                    metrics.watching_models(lambda: registry_stats(root))
                )
            if multiprocess_dir() is None:  # with several workers the supervisor serves it
                endpoint = await start_metrics_server(
                    settings.metrics, metrics_registry, readiness, source=settings.source
                )
                stack.push_async_callback(endpoint.close)
        # Fact failures: counted, logged once a minute per fact and kind, /readyz degraded.
        faults = FactFaults(
            quiet=settings.metrics.degraded_for,
            count=metrics.fact_failed if metrics is not None else None,
        )
        readiness.faults = faults
        await _check_state(services, faults)
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
            failures=faults,
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
        milter = await _start_milter(settings, pipeline, required=not smtp)
        if milter is not None:
            stack.push_async_callback(milter.close, settings.smtp.drain_timeout)
        if smtp:
            server = await start_server(deps, sock or _smtp_socket(settings))
        else:  # relay milter: the milter's listener is the one readiness watches
            assert milter is not None and milter.server is not None
            server = milter.server
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
            milter=milter,
        )
        try:
            yield runtime
        finally:
            server.close()  # stop accepting first
            await sessions.drain(settings.smtp.drain_timeout)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), timeout=2.0)


def _smtp_socket(settings: Settings) -> socket.socket:
    host, port = settings.smtp.listen
    try:
        return listening_socket(host, port, reuse_port=settings.smtp.workers > 1)
    except OSError as exc:
        raise ConfigError(
            settings.source, "smtp.listen", f"cannot listen on {host}:{port}: {exc.strerror}"
        ) from None


async def _start_milter(
    settings: Settings, pipeline: Pipeline, *, required: bool
) -> MilterServer | None:
    """The milter door on ``[milter] listen`` (relay/milter/), beside or instead of SMTP."""
    listen = settings.milter.listen
    if not listen:
        if required:
            raise ConfigError(settings.source, "milter.listen", "relay milter needs an address")
        return None
    workers = settings.smtp.workers
    if listen.startswith("unix:") and workers > 1:
        # A unix socket cannot be shared with SO_REUSEPORT; each worker would replace it.
        raise ConfigError(settings.source, "milter.listen", "use inet:HOST:PORT with workers > 1")
    limits = MilterLimits(settings.smtp.max_message_size, settings.milter.idle_timeout)
    milter = MilterServer(pipeline, settings.milter, limits)
    try:
        await milter.start(reuse_port=workers > 1)
    except OSError as exc:
        raise ConfigError(
            settings.source, "milter.listen", f"cannot listen on {listen}: {exc}"
        ) from None
    log.info("milter listening on %s (pid %d)", milter.address, os.getpid())
    return milter


async def run(
    settings: Settings, on_ready: Callable[[], None] | None = None, *, smtp: bool = True
) -> None:
    """Serve until SIGTERM/SIGINT; SIGHUP reloads the policy and the model version."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    async with lifespan(settings, smtp=smtp) as runtime:
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, runtime.reload)
        if smtp:
            host, _ = settings.smtp.listen
            log.info("relay listening on %s:%d (pid %d)", host, runtime.port, os.getpid())
        # Everything loaded at start-up (model, policy, suffix list) lives for the whole
        # run: freezing it keeps full garbage collections from walking it, which measured
        # as loop stalls of ~15 ms without and < 1 ms with (bench/results/auth.md). The
        # garbage of start-up goes first (frozen, it would stay for good), and the heap it
        # leaves free goes back to the OS rather than staying in this process's RSS.
        gc.collect()
        gc.freeze()
        release_free_memory()
        if on_ready is not None:
            on_ready()
        await stop.wait()
        log.info("shutting down: draining sessions (up to %.0fs)", settings.smtp.drain_timeout)
    log.info("stopped")


def worker_main(
    config_path: str,
    index: int,
    on_ready: Callable[[], None],
    smtp: bool = True,
) -> None:
    """One worker process (a fresh interpreter, ``python -m relay.launch``), called by
    ``launch.worker_entry``: the supervisor never imports the app. ``on_ready`` tells the
    supervisor that this worker serves."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor owns Ctrl-C
    settings = load_settings(Path(config_path))
    configure_logging(settings.log.level)
    try:
        asyncio.run(run(settings, on_ready=on_ready, smtp=smtp))
    except RelayError as exc:
        logging.getLogger("relay").error("worker %d: %s", index, exc)
        raise SystemExit(2) from None
