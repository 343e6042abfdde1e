"""Builders shared by the composition root, `relay scan` and the lab: Settings in,
services, transport, policy and header stamps out.

The app's lifespan, `relay scan` and the lab build the same parts the same way; keeping
the builders here (not in app.py) lets the lab and the CLI reuse them without importing
the server. May import everything below the front doors; nothing above.
"""

from __future__ import annotations

import contextlib

from publicsuffixlist import PublicSuffixList

from relay.auth.checker import Authenticator
from relay.config import Settings
from relay.contracts import Decider, Stamp, Transport
from relay.delivery.transports import MaildirTransport, SmtpTransport
from relay.dns import Resolver
from relay.facts import FactRegistry, Services
from relay.facts.bulk import CorrespondentRecorder
from relay.pipeline.authresults import AuthResultsStamp
from relay.policy import load_policy
from relay.policy.holder import NOOP
from relay.state import StateStore, open_state


async def open_services(settings: Settings, stack: contextlib.AsyncExitStack) -> list[object]:
    """Long-lived services handed to fact functions; each closes on the stack."""
    services: list[object] = []
    resolver = Resolver(settings.dns)  # the one DNS cache every check shares
    stack.push_async_callback(resolver.close)
    services.append(resolver)
    psl = PublicSuffixList()  # organisational domains for auth, header and bulk facts
    if settings.auth.enabled:
        authenticator = Authenticator.from_settings(resolver, settings.auth, psl)
        stack.push_async_callback(authenticator.close)
        await authenticator.start()
        services.append(authenticator)
    state = await open_state(settings.state)  # counters every worker shares (bulk, rates)
    stack.push_async_callback(state.close)
    services.append(state)
    services.append(psl)
    if settings.model.enabled:
        from relay.classifier.model import Classifier

        # Raises ModelError for a missing, changed or untrusted model: never serve without it.
        classifier = await Classifier.open(settings.model.path, workers=settings.model.workers)
        stack.push_async_callback(classifier.close)
        services.append(classifier)
    return services


def build_stamps(settings: Settings, services: Services | None = None) -> list[Stamp]:
    """Header stamps applied after the decision, in order."""
    stamps: list[Stamp] = []
    if settings.auth.enabled:
        stamps.append(AuthResultsStamp(settings.authserv_id))
    state = services.find(StateStore) if services is not None else None
    if state is not None and settings.relay.networks:
        # Learns whom local users write to (known_correspondent); never changes the message.
        stamps.append(CorrespondentRecorder(state, settings.relay.networks))
    return stamps


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


def load_decider(settings: Settings, registry: FactRegistry) -> Decider:
    """The configured policy, or the no-op decision when no policy file is set."""
    if settings.policy.path is None:
        return NOOP
    return load_policy(settings.policy.path, registry)


def load_shadow(settings: Settings, registry: FactRegistry) -> list[Decider]:
    """Extra regimes evaluated in shadow next to the policy (their verdicts are recorded)."""
    return [load_policy(path, registry) for path in settings.policy.shadow]
