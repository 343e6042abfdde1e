"""Builders shared by the composition root, `relay scan` and the lab: Settings in,
services, transport, policy and header stamps out.

The app's lifespan, `relay scan` and the lab build the same parts the same way; keeping
the builders here (not in app.py) lets the lab and the CLI reuse them without importing
the server. May import everything below the front doors; nothing above.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from publicsuffixlist import PublicSuffixList

from relay.auth.checker import Authenticator
from relay.config import Settings
from relay.contracts import Decider, Stamp, Transport
from relay.delivery.maildir import MaildirTransport
from relay.delivery.smtp import SmtpTransport
from relay.dns import Resolver
from relay.errors import ConfigError
from relay.facts import FactRegistry, Services
from relay.feedback.store import open_feedback
from relay.pipeline.authresults import AuthResultsStamp
from relay.pipeline.recorder import Recorder
from relay.policy import load_policy
from relay.policy.engine import Policy
from relay.policy.holder import NOOP
from relay.policy.reload import service_problems
from relay.proc.celsandbox import ConditionSandbox
from relay.secretkey import SecretKey
from relay.state import open_state

if TYPE_CHECKING:  # the relay process imports serving only when a model is enabled
    from relay.classifier.serving import Classifier


async def open_services(
    settings: Settings,
    stack: contextlib.AsyncExitStack,
    *,
    key: SecretKey,
    readonly_state: bool = False,
    require_state: bool = True,
) -> Services:
    """Long-lived services handed to fact functions; each closes on the stack. A service
    that is configured but cannot start (a missing model, ...) fails here, at start-up.
    ``key`` (the relay's secret key) keys the state store's address hashes.
    ``readonly_state`` (``relay scan``): the configured state store is opened read-only,
    so facts read the live counts and nothing is written, created or locked.
    ``require_state=False`` (the relay): a Redis that does not answer at start is no error;
    the state and feedback stores fail each use until it answers (the relay starts
    degraded, docs/operations.md "Several instances, one Redis")."""
    resolver = Resolver(settings.dns)  # the one DNS cache every check shares
    stack.push_async_callback(resolver.close)
    psl = PublicSuffixList()  # organisational domains for auth, header and bulk facts
    authenticator: Authenticator | None = None
    if settings.auth.enabled:
        # With the classifier on, verification runs in its children (open_classifier).
        shared = settings.model.enabled
        authenticator = Authenticator.from_settings(resolver, settings.auth, psl, shared=shared)
        stack.push_async_callback(authenticator.close)
        await authenticator.start()
    # Counters every worker shares (bulk, rates): facts read them, the recorder writes.
    state = await open_state(
        settings.state, key, readonly=readonly_state, require_answer=require_state
    )
    stack.push_async_callback(state.close)
    classifier = None
    if settings.model.enabled:
        # Raises ModelError for a missing, changed or untrusted model: never serve without it.
        from relay.models.registry import current_model_path

        # The promoted version (relay model promote), else [model] path.
        path = current_model_path(settings)
        classifier = await open_classifier(settings, path, authenticator)
        stack.push_async_callback(classifier.close)
    # Learned reputation (facts/reputation.py) reads the feedback store's counters; a
    # read-only scan reads them too (nothing created or written), so `relay scan` explains
    # a verdict with the standing the relay itself saw.
    reputation = await open_feedback(
        settings.state,
        settings.feedback,
        key,
        require_answer=require_state,
        readonly=readonly_state,
    )
    stack.push_async_callback(reputation.close)
    return Services(
        resolver=resolver,
        state=state,
        psl=psl,
        authenticator=authenticator,
        classifier=classifier,
        reputation=reputation,
        greylist=settings.greylist,  # always given: "enabled = false" is the facts' "off"
        ratelimit=settings.ratelimit,
    )


async def open_classifier(
    settings: Settings, path: Path, authenticator: Authenticator | None = None
) -> Classifier:
    """The classifier serving the model at ``path`` (at start-up and at each model hot
    swap). When ``authenticator`` verifies in shared children, the classifier's children
    are ``relay.analysis`` processes that verify too (one interpreter per relay worker, not
    two: issue 17), max(``[model] workers``, ``[auth] workers``) of them, and the
    authenticator moves to them; the pool it leaves closes with the classifier that owned
    it, once no message uses that classifier (models/holder.py). Raises ModelError."""
    from relay.analysis import MODULE as ANALYSIS_MODULE
    from relay.classifier.serving import CHILD_MODULE, Classifier

    m = settings.model
    shared = authenticator is not None and authenticator.shared
    classifier = await Classifier.open(
        path,
        workers=max(m.workers, settings.auth.workers) if shared else m.workers,
        kill_after=m.timeout,
        max_pending=m.max_pending,
        module=ANALYSIS_MODULE if shared else CHILD_MODULE,
        nice=m.nice,
    )
    if shared:
        assert authenticator is not None
        authenticator.share(classifier.children)
    return classifier


def check_services(
    settings: Settings, registry: FactRegistry, services: Services, deciders: Iterable[Decider]
) -> None:
    """ConfigError naming the policy, the fact and the service when a policy (the one in
    force or a shadow one) reads a fact whose service is not configured, e.g. the
    classifier's facts with ``[model] enabled = false``: the relay refuses to start rather
    than find the service missing on every message. Lab-only facts are exempt (see
    ``facts.base.missing_services``)."""
    problems = [
        problem
        for decider in deciders
        if isinstance(decider, Policy)
        for problem in service_problems(decider, registry, services)
    ]
    if problems:
        raise ConfigError(settings.source, "policy", "; ".join(problems))


def build_stamps(settings: Settings, services: Services | None = None) -> list[Stamp]:
    """Header stamps applied after the decision, in order."""
    stamps: list[Stamp] = []
    if settings.auth.enabled:
        stamps.append(AuthResultsStamp(settings.authserv_id))
    return stamps


def build_recorder(settings: Settings, services: Services) -> Recorder | None:
    """The one writer of shared state, run after the action (pipeline/recorder.py); None
    without a state store. ``relay scan`` and the lab's parallel pass build none."""
    state = services.state
    if state is None:
        return None
    psl = services.psl or PublicSuffixList()
    return Recorder(
        state,
        psl,
        settings.relay.networks,
        greylist=settings.greylist,
        ratelimit=settings.ratelimit,
    )


def build_transport(settings: Settings) -> Transport:
    d = settings.delivery
    if d.mode == "smtp":
        host, port = d.downstream
        return SmtpTransport(
            host,
            port,
            hostname=settings.smtp.hostname,
            timeout=d.timeout,
            starttls=d.starttls,
            pool_size=d.pool_size,
        )
    return MaildirTransport(d.maildir)


def load_decider(
    settings: Settings, registry: FactRegistry, sandbox: ConditionSandbox | None = None
) -> Decider:
    """The configured policy, or the no-op decision when no policy file is set."""
    if settings.policy.path is None:
        return NOOP
    return load_policy(settings.policy.path, registry, sandbox)


def load_shadow(
    settings: Settings, registry: FactRegistry, sandbox: ConditionSandbox | None = None
) -> list[Decider]:
    """Extra regimes evaluated in shadow next to the policy (their verdicts are recorded)."""
    return [load_policy(path, registry, sandbox) for path in settings.policy.shadow]


def open_sandbox(settings: Settings, stack: contextlib.AsyncExitStack) -> ConditionSandbox:
    """The child that runs conditions with comprehensions, closed with ``stack`` (it only
    starts when a policy has such a condition)."""
    sandbox = ConditionSandbox(settings.policy.condition_time_limit)
    stack.push_async_callback(sandbox.close)
    return sandbox
