"""The only reader of configuration files: TOML -> frozen, validated Settings.

One module because every section is validated through one reader that names the file
and the key; over 300 lines because each section's settings are declared and checked
here, field by field.

Every error names the file, the key and the reason. Unknown keys are errors too, because
a misspelt limit silently falling back to its default is how gateways become open relays.
Relative paths are taken from the working directory the relay is started in.
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

from relay.errors import ConfigError
from relay.idn import to_alabel

DEFAULT_CONFIG = Path("config/relay.toml")

T = TypeVar("T")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_hostport(text: str, *, default_port: int | None = None) -> tuple[str, int]:
    """'host:port', '[v6]:port' or (with default_port) a bare host."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not port_text:
        if default_port is None:
            raise ValueError(f"{text!r} has no port (expected host:port)")
        return host, default_port
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    if not host:
        raise ValueError(f"{text!r} has no host")
    return host, port


@dataclass(frozen=True, slots=True)
class SmtpSettings:
    listen: tuple[str, int] = ("127.0.0.1", 2525)
    hostname: str = "relay.localhost"
    max_message_size: int = 25 * 1024 * 1024
    # DATA beyond large_message_size must reserve its SIZE= (else max_message_size) out of
    # large_message_memory, per worker (relay/smtp/budget.py); no room: 452/451 4.3.1.
    large_message_size: int = 256 * 1024
    large_message_memory: int = 100 * 1024 * 1024  # four messages of the largest size
    max_recipients: int = 100
    command_timeout: float = 300.0  # RFC 5321 4.5.3.2.7: at least 5 minutes
    data_timeout: float = 600.0  # whole DATA phase, so slow-drip senders are cut off
    max_connections: int = 500
    max_errors: int = 20  # 4xx/5xx replies in one session before 421 (Postfix hard_error_limit)
    max_junk_commands: int = 100  # NOOP/RSET/VRFY/HELP/EHLO/HELO per session before 421
    max_line_length: int = 998  # RFC 5322 2.1.1, without CRLF
    workers: int = 1  # processes sharing the listening socket (SO_REUSEPORT)
    drain_timeout: float = 30.0  # on SIGTERM, how long in-flight sessions may finish
    tls_cert: Path | None = None  # PEM chain; with tls_key, STARTTLS is offered
    tls_key: Path | None = None
    xforward_hosts: tuple[IPNetwork, ...] = ()  # clients trusted to send XFORWARD (Postfix)


@dataclass(frozen=True, slots=True)
class RelaySettings:
    domains: tuple[str, ...] = ("localhost",)
    networks: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True, slots=True)
class MilterSettings:
    """The milter front door (relay/milter/): off unless ``listen`` is set."""

    listen: str = ""  # "inet:HOST:PORT", "HOST:PORT" or "unix:/path"; "" = off
    max_connections: int = 500
    idle_timeout: float = 600.0  # the MTA's silence before we close (Postfix: smtpd_timeout)
    socket_mode: int = 0o660  # a unix socket's permissions (the MTA's group must connect)


@dataclass(frozen=True, slots=True)
class DeliverySettings:
    mode: Literal["maildir", "smtp"] = "maildir"
    maildir: Path = Path("var/maildir")
    downstream: tuple[str, int] = ("127.0.0.1", 10025)
    starttls: bool = False
    timeout: float = 60.0
    pool_size: int = 16  # idle downstream connections kept for reuse


@dataclass(frozen=True, slots=True)
class DnsSettings:
    nameservers: tuple[tuple[str, int], ...] = ()  # empty: the system's resolv.conf
    timeout: float = 3.0
    cache_size: int = 10000
    dnsbl_zones: tuple[str, ...] = ()  # DNS blocklists for dnsbl_listed; empty: none asked


# A child's answer must come well before the sender gives up on the reply to DATA (RFC 5321
# 4.5.3.2.6: 10 minutes), or the deferral it triggers would never reach the sender.
MAX_CHILD_TIMEOUT = 300.0
MAX_NICE = 19  # the lowest priority Linux has


@dataclass(frozen=True, slots=True)
class AuthSettings:
    enabled: bool = True
    authserv_id: str = ""  # empty: smtp.hostname
    workers: int = 1  # DKIM/ARC verification processes per relay worker; 0 = one thread
    # Seconds a message's verification may take in a child before the child is killed and
    # replaced (the message's auth facts fail); docs/operations.md "Overload".
    timeout: float = 30.0
    max_pending: int = 256  # messages waiting for the children, per worker; more fail at once


@dataclass(frozen=True, slots=True)
class ModelSettings:
    enabled: bool = True
    path: Path = Path("models/spam.skops")
    workers: int = 1  # classifier child processes per relay worker
    # Seconds a message may wait for its classification before the child is killed and
    # replaced (the message fails: 451 when the policy requires spam_probability).
    timeout: float = 10.0
    max_pending: int = 256  # messages waiting for the children, per worker; more fail at once
    # Steps of nice above the worker's for its analysis children, so a worker's event loop
    # wins a contended core from them (docs/operations.md "Event-loop lag"); 0 to 19.
    nice: int = 5
    # Model versions (relay/models/, docs/classifier.md "Model versions"):
    registry: Path = Path("var/models")  # one folder per version, CURRENT, history
    held_out_share: float = 0.2  # newest share of scored feedback never trained on
    promote_threshold: float = 0.9  # p at which mail counts as blocked for the gate
    promote_max_fpr: float = 0.01  # held-out feedback ham blocked at that p, at most
    promote_tolerance: float = 0.01  # AUC / recall may drop at most this much


@dataclass(frozen=True, slots=True)
class PolicySettings:
    path: Path | None = Path("config/policy.toml")  # None: accept everything (no-op)
    shadow: tuple[Path, ...] = ()  # extra regimes evaluated in shadow next to the policy
    shadow_log: Path | None = None  # JSON lines of shadow verdicts for `relay lab`
    # Seconds per message for the conditions with comprehensions, which run in a child
    # process (relay.proc.celsandbox); a message that overruns them is deferred (4xx).
    condition_time_limit: float = 0.5


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    enabled: bool = True
    listen: tuple[str, int] = ("127.0.0.1", 9325)
    # Seconds /readyz stays "degraded" after the last fact failure (ops/faults.py), unless
    # a probe of the state backend succeeds first.
    degraded_for: float = 120.0


@dataclass(frozen=True, slots=True)
class StateSettings:
    backend: Literal["sqlite", "redis"] = "sqlite"
    path: Path = Path("var/state.sqlite3")
    url: str = "redis://127.0.0.1:6379/0"
    # Seconds a Redis connect or command may take; past it the fact fails (counted) and
    # the message goes on, so a hung Redis never holds a session.
    timeout: float = 1.0


@dataclass(frozen=True, slots=True)
class QuarantineSettings:
    path: Path = Path("var/quarantine")


@dataclass(frozen=True, slots=True)
class FeedbackSettings:
    """Learned feedback (relay/feedback/): limits, the HTTP endpoint, release as ham."""

    max_message_size: int = 10 * 1024 * 1024  # bytes; bigger reports are refused
    max_entries: int = 200_000  # the oldest entries are evicted beyond this
    max_age_days: int = 365  # older entries are dropped on the next write
    per_reporter_daily: int = 200  # reports per reporter in 24 hours, then refused
    reporter_share: float = 0.1  # training: at most this share of a class from one reporter
    keep_bodies: bool = False  # store the raw message too (off: features and domains only)
    http_listen: tuple[str, int] = ("127.0.0.1", 9326)
    http_token_file: Path | None = None  # None: the HTTP endpoint is off
    ham_on_release: bool = True  # `relay quarantine release` records the message as ham
    reputation_half_life_days: float = 30.0  # a report's weight halves every this many days
    reputation_per_reporter: int = 3  # reports one reporter adds to one identity's counts
    reputation_cache_seconds: float = 10.0  # a worker reuses counters it read; 0 = never


@dataclass(frozen=True, slots=True)
class GreylistSettings:
    """Greylisting by (client network, sender, recipient); a policy rule decides whether
    to defer on the ``greylist`` fact (docs/policy.md, "Greylisting")."""

    enabled: bool = True  # false: the facts say "off" under every policy (a kill switch)
    delay: float = 300.0  # seconds a new triplet waits before a retry passes
    retry_window: float = 4 * 3600.0  # seconds after the delay in which a retry counts
    lifetime: float = 36 * 86400.0  # a passed triplet is remembered this long after last use
    ipv4_prefix: int = 24  # client network of a triplet: senders retry from a pool
    ipv6_prefix: int = 64
    auto_allow_after: int = 5  # passed triplets that exempt their client network; 0 = never
    exempt_networks: tuple[IPNetwork, ...] = ()
    exempt_dmarc_pass: bool = True  # mail whose From domain passes DMARC is never deferred
    exempt_sender_domains: tuple[str, ...] = ()  # A-labels; exempt when SPF or DKIM passes


@dataclass(frozen=True, slots=True)
class RateBucket:
    """One token bucket per key: ``rate`` tokens a minute refill it up to ``burst``."""

    rate: float = 0.0  # per minute; 0 = this bucket is off
    burst: int = 1

    @property
    def enabled(self) -> bool:
        return self.rate > 0


@dataclass(frozen=True, slots=True)
class RateLimitSettings:
    """Token buckets per client address, sender domain and recipient (docs/policy.md,
    "Rate limits"); a policy rule decides whether to defer on the ``rate_*`` facts."""

    client_ip: RateBucket = RateBucket(60.0, 120)
    sender_domain: RateBucket = RateBucket(300.0, 600)
    recipient: RateBucket = RateBucket(30.0, 60)
    ipv6_prefix: int = 64  # an IPv6 client is its /64: a host has the whole prefix
    exempt_networks: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True, slots=True)
class SecuritySettings:
    # The secret key (relay/secretkey.py): seals quarantine entries, keys address hashes.
    key_file: Path = Path("var/relay.key")


@dataclass(frozen=True, slots=True)
class LogSettings:
    level: Literal["debug", "info", "warning", "error"] = "info"


@dataclass(frozen=True, slots=True)
class Settings:
    smtp: SmtpSettings = field(default_factory=SmtpSettings)
    relay: RelaySettings = field(default_factory=RelaySettings)
    milter: MilterSettings = field(default_factory=MilterSettings)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    dns: DnsSettings = field(default_factory=DnsSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    state: StateSettings = field(default_factory=StateSettings)
    quarantine: QuarantineSettings = field(default_factory=QuarantineSettings)
    feedback: FeedbackSettings = field(default_factory=FeedbackSettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)
    greylist: GreylistSettings = field(default_factory=GreylistSettings)
    ratelimit: RateLimitSettings = field(default_factory=RateLimitSettings)
    log: LogSettings = field(default_factory=LogSettings)
    source: str = "<defaults>"

    @property
    def authserv_id(self) -> str:
        return self.auth.authserv_id or self.smtp.hostname


class _Reader:
    """Reads one TOML table into a settings dataclass, naming file and key on error."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, key: str, reason: str) -> ConfigError:
        return ConfigError(self.path, key, reason)

    def table(self, data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
        value = data.get(key, {})
        if not isinstance(value, dict):
            raise self.fail(key, "must be a table")
        return value

    def check_keys(self, section: str, table: Mapping[str, Any], cls: type[Any]) -> None:
        known = {f.name for f in fields(cls)}
        for key in table:
            if key not in known:
                raise self.fail(
                    f"{section}.{key}", f"unknown key (known: {', '.join(sorted(known))})"
                )

    def get(self, table: Mapping[str, Any], section: str, key: str, kind: type[T], default: T) -> T:
        if key not in table:
            return default
        value = table[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.fail(
                f"{section}.{key}", f"must be {kind.__name__}, got {type(value).__name__}"
            )
        return value

    def positive(self, table: Mapping[str, Any], section: str, key: str, default: float) -> float:
        value = self.get(table, section, key, float, float(default))
        if value <= 0:
            raise self.fail(f"{section}.{key}", "must be greater than 0")
        return value

    def seconds_or_off(
        self, table: Mapping[str, Any], section: str, key: str, default: float
    ) -> float:
        value = self.get(table, section, key, float, float(default))
        if value < 0:
            raise self.fail(f"{section}.{key}", "must be 0 (off) or more")
        return value

    def count(self, table: Mapping[str, Any], section: str, key: str, default: int) -> int:
        value = self.get(table, section, key, int, default)
        if value < 1:
            raise self.fail(f"{section}.{key}", "must be at least 1")
        return value

    def strings(
        self, table: Mapping[str, Any], section: str, key: str, default: tuple[str, ...]
    ) -> tuple[str, ...]:
        value = table.get(key, list(default))
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(f"{section}.{key}", "must be a list of strings")
        return tuple(value)

    def hostport(
        self, table: Mapping[str, Any], section: str, key: str, default: tuple[str, int]
    ) -> tuple[str, int]:
        if key not in table:
            return default
        text = self.get(table, section, key, str, "")
        try:
            return parse_hostport(text)
        except ValueError as exc:
            raise self.fail(f"{section}.{key}", str(exc)) from None

    def choice(
        self,
        table: Mapping[str, Any],
        section: str,
        key: str,
        options: tuple[str, ...],
        default: str,
    ) -> str:
        value = self.get(table, section, key, str, default)
        if value not in options:
            raise self.fail(
                f"{section}.{key}", f"must be one of {', '.join(options)}; got {value!r}"
            )
        return value


def _networks(r: _Reader, t: Mapping[str, Any], section: str, key: str) -> tuple[IPNetwork, ...]:
    networks: list[IPNetwork] = []
    for text in r.strings(t, section, key, ()):
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError as exc:
            raise r.fail(f"{section}.{key}", str(exc)) from None
    return tuple(networks)


def _optional_path(text: str) -> Path | None:
    return Path(text) if text else None


def _domain(reader: _Reader, key: str, text: str) -> str:
    """A-label form (relay.idn), as relay control compares it; a leading "." (every
    subdomain) is kept."""
    raw = text.strip().rstrip(".").lower()  # the operator's own spelling may be mixed-case
    suffix = raw.startswith(".")
    try:
        domain = to_alabel(raw[1:] if suffix else raw)
    except ValueError:
        raise reader.fail(key, f"invalid domain {text!r}") from None
    return "." + domain if suffix else domain


def _inside(path: Path, folder: Path) -> bool:
    """``path`` is ``folder`` or below it, symlinks and ``..`` resolved (neither needs to
    exist yet)."""
    return path.resolve().is_relative_to(folder.resolve())


def settings_from_mapping(data: Mapping[str, Any], path: str = "<mapping>") -> Settings:
    """Validate an already-parsed TOML document (tests build settings this way)."""
    r = _Reader(path)
    sections = {f.name: f.type for f in fields(Settings) if f.name != "source"}
    for key in data:
        if key not in sections:
            raise r.fail(key, f"unknown section (known: {', '.join(sorted(sections))})")

    t = r.table(data, "smtp")
    r.check_keys("smtp", t, SmtpSettings)
    d = SmtpSettings()
    smtp = SmtpSettings(
        listen=r.hostport(t, "smtp", "listen", d.listen),
        hostname=r.get(t, "smtp", "hostname", str, d.hostname),
        max_message_size=r.count(t, "smtp", "max_message_size", d.max_message_size),
        large_message_size=r.count(t, "smtp", "large_message_size", d.large_message_size),
        large_message_memory=r.count(t, "smtp", "large_message_memory", d.large_message_memory),
        max_recipients=r.count(t, "smtp", "max_recipients", d.max_recipients),
        command_timeout=r.positive(t, "smtp", "command_timeout", d.command_timeout),
        data_timeout=r.positive(t, "smtp", "data_timeout", d.data_timeout),
        max_connections=r.count(t, "smtp", "max_connections", d.max_connections),
        max_errors=r.count(t, "smtp", "max_errors", d.max_errors),
        max_junk_commands=r.count(t, "smtp", "max_junk_commands", d.max_junk_commands),
        max_line_length=r.count(t, "smtp", "max_line_length", d.max_line_length),
        workers=r.count(t, "smtp", "workers", d.workers),
        drain_timeout=r.positive(t, "smtp", "drain_timeout", d.drain_timeout),
        tls_cert=_optional_path(r.get(t, "smtp", "tls_cert", str, "")),
        tls_key=_optional_path(r.get(t, "smtp", "tls_key", str, "")),
        xforward_hosts=_networks(r, t, "smtp", "xforward_hosts"),
    )
    if (smtp.tls_cert is None) != (smtp.tls_key is None):
        raise r.fail("smtp.tls_key", "tls_cert and tls_key go together")
    if smtp.max_line_length < 78:
        raise r.fail("smtp.max_line_length", "must be at least 78")
    if smtp.large_message_memory < smtp.max_message_size:
        # else a message of the largest size could never be taken, whatever the load
        raise r.fail("smtp.large_message_memory", "must be at least max_message_size")

    t = r.table(data, "relay")
    r.check_keys("relay", t, RelaySettings)
    domains = tuple(
        _domain(r, "relay.domains", v)
        for v in r.strings(t, "relay", "domains", RelaySettings().domains)
    )
    relay = RelaySettings(domains=domains, networks=_networks(r, t, "relay", "networks"))

    t = r.table(data, "delivery")
    r.check_keys("delivery", t, DeliverySettings)
    dd = DeliverySettings()
    delivery = DeliverySettings(
        mode=cast(
            Literal["maildir", "smtp"],
            r.choice(t, "delivery", "mode", ("maildir", "smtp"), dd.mode),
        ),
        maildir=Path(r.get(t, "delivery", "maildir", str, str(dd.maildir))),
        downstream=r.hostport(t, "delivery", "downstream", dd.downstream),
        starttls=r.get(t, "delivery", "starttls", bool, dd.starttls),
        timeout=r.positive(t, "delivery", "timeout", dd.timeout),
        pool_size=r.get(t, "delivery", "pool_size", int, dd.pool_size),
    )

    t = r.table(data, "dns")
    r.check_keys("dns", t, DnsSettings)
    ns: list[tuple[str, int]] = []
    for text in r.strings(t, "dns", "nameservers", ()):
        try:
            ns.append(parse_hostport(text, default_port=53))
        except ValueError as exc:
            raise r.fail("dns.nameservers", str(exc)) from None
    dns = DnsSettings(
        nameservers=tuple(ns),
        timeout=r.positive(t, "dns", "timeout", DnsSettings().timeout),
        cache_size=r.get(t, "dns", "cache_size", int, DnsSettings().cache_size),
        dnsbl_zones=tuple(
            _domain(r, "dns.dnsbl_zones", v) for v in r.strings(t, "dns", "dnsbl_zones", ())
        ),
    )

    t = r.table(data, "auth")
    r.check_keys("auth", t, AuthSettings)
    auth = AuthSettings(
        enabled=r.get(t, "auth", "enabled", bool, True),
        authserv_id=r.get(t, "auth", "authserv_id", str, ""),
        workers=r.get(t, "auth", "workers", int, AuthSettings().workers),
        timeout=r.positive(t, "auth", "timeout", AuthSettings().timeout),
        max_pending=r.count(t, "auth", "max_pending", AuthSettings().max_pending),
    )
    if not 0 <= auth.workers <= 64:
        raise r.fail("auth.workers", "must be between 0 and 64")
    if auth.timeout > MAX_CHILD_TIMEOUT:
        raise r.fail("auth.timeout", f"must be at most {MAX_CHILD_TIMEOUT:g} seconds")

    t = r.table(data, "model")
    r.check_keys("model", t, ModelSettings)
    model = ModelSettings(
        enabled=r.get(t, "model", "enabled", bool, True),
        path=Path(r.get(t, "model", "path", str, str(ModelSettings().path))),
        workers=r.count(t, "model", "workers", ModelSettings().workers),
        timeout=r.positive(t, "model", "timeout", ModelSettings().timeout),
        max_pending=r.count(t, "model", "max_pending", ModelSettings().max_pending),
        nice=r.get(t, "model", "nice", int, ModelSettings().nice),
        registry=Path(r.get(t, "model", "registry", str, str(ModelSettings().registry))),
        held_out_share=r.positive(t, "model", "held_out_share", ModelSettings().held_out_share),
        promote_threshold=r.positive(
            t, "model", "promote_threshold", ModelSettings().promote_threshold
        ),
        promote_max_fpr=r.get(t, "model", "promote_max_fpr", float, 0.01),
        promote_tolerance=r.get(t, "model", "promote_tolerance", float, 0.01),
    )
    if model.timeout > MAX_CHILD_TIMEOUT:
        raise r.fail("model.timeout", f"must be at most {MAX_CHILD_TIMEOUT:g} seconds")
    if not 0 <= model.nice <= MAX_NICE:
        raise r.fail("model.nice", f"must be between 0 and {MAX_NICE}")
    for key in ("held_out_share", "promote_threshold"):
        if not 0 < getattr(model, key) < 1:
            raise r.fail(f"model.{key}", "must be between 0 and 1")
    for key in ("promote_max_fpr", "promote_tolerance"):
        if not 0 <= getattr(model, key) <= 1:
            raise r.fail(f"model.{key}", "must be between 0 and 1")

    t = r.table(data, "policy")
    r.check_keys("policy", t, PolicySettings)
    policy_path = r.get(t, "policy", "path", str, str(PolicySettings().path))
    shadow_log = r.get(t, "policy", "shadow_log", str, "")
    policy = PolicySettings(
        path=Path(policy_path) if policy_path else None,
        shadow=tuple(Path(p) for p in r.strings(t, "policy", "shadow", ())),
        shadow_log=Path(shadow_log) if shadow_log else None,
        condition_time_limit=r.positive(
            t, "policy", "condition_time_limit", PolicySettings().condition_time_limit
        ),
    )

    t = r.table(data, "metrics")
    r.check_keys("metrics", t, MetricsSettings)
    metrics = MetricsSettings(
        enabled=r.get(t, "metrics", "enabled", bool, True),
        listen=r.hostport(t, "metrics", "listen", MetricsSettings().listen),
        degraded_for=r.positive(t, "metrics", "degraded_for", MetricsSettings().degraded_for),
    )

    t = r.table(data, "state")
    r.check_keys("state", t, StateSettings)
    state = StateSettings(
        backend=cast(
            Literal["sqlite", "redis"],
            r.choice(t, "state", "backend", ("sqlite", "redis"), "sqlite"),
        ),
        path=Path(r.get(t, "state", "path", str, str(StateSettings().path))),
        url=r.get(t, "state", "url", str, StateSettings().url),
        timeout=r.positive(t, "state", "timeout", StateSettings().timeout),
    )

    t = r.table(data, "quarantine")
    r.check_keys("quarantine", t, QuarantineSettings)
    quarantine = QuarantineSettings(
        path=Path(r.get(t, "quarantine", "path", str, str(QuarantineSettings().path)))
    )

    feedback = _feedback(r, r.table(data, "feedback"))

    t = r.table(data, "security")
    r.check_keys("security", t, SecuritySettings)
    key_file = r.get(t, "security", "key_file", str, str(SecuritySettings().key_file))
    if not key_file:
        raise r.fail("security.key_file", "must name a file")
    security = SecuritySettings(key_file=Path(key_file))
    if _inside(security.key_file, quarantine.path):
        # Whoever may edit quarantine entries must not also read the key that seals them.
        raise r.fail(
            "security.key_file",
            f"{key_file!r} is inside [quarantine] path {str(quarantine.path)!r}; "
            "keep the key outside the quarantine folder",
        )

    t = r.table(data, "log")
    r.check_keys("log", t, LogSettings)
    log = LogSettings(
        level=cast(
            Literal["debug", "info", "warning", "error"],
            r.choice(t, "log", "level", ("debug", "info", "warning", "error"), "info"),
        )
    )

    return Settings(
        smtp=smtp,
        relay=relay,
        milter=_milter(r, r.table(data, "milter")),
        delivery=delivery,
        dns=dns,
        auth=auth,
        model=model,
        policy=policy,
        metrics=metrics,
        state=state,
        quarantine=quarantine,
        feedback=feedback,
        security=security,
        greylist=_greylist(r, r.table(data, "greylist")),
        ratelimit=_ratelimit(r, r.table(data, "ratelimit")),
        log=log,
        source=path,
    )


def parse_milter_listen(text: str) -> tuple[str, str, int]:
    """("inet", host, port) or ("unix", path, 0) from Postfix's spelling of a milter
    address ("inet:host:port", "unix:/path") or a plain "host:port"."""
    if text.startswith("unix:"):
        path = text[5:]
        if not path.startswith("/"):
            raise ValueError(f"{text!r}: a unix socket needs an absolute path")
        return "unix", path, 0
    host, port = parse_hostport(text.removeprefix("inet:").removeprefix("inet6:"))
    return "inet", host, port


def _milter(r: _Reader, t: Mapping[str, Any]) -> MilterSettings:
    r.check_keys("milter", t, MilterSettings)
    d = MilterSettings()
    listen = r.get(t, "milter", "listen", str, d.listen)
    if listen:
        try:
            parse_milter_listen(listen)
        except ValueError as exc:
            raise r.fail("milter.listen", str(exc)) from None
    mode = r.get(t, "milter", "socket_mode", int, d.socket_mode)
    if not 0 <= mode <= 0o777:
        raise r.fail("milter.socket_mode", "must be a permission mode such as 0o660")
    return MilterSettings(
        listen=listen,
        max_connections=r.count(t, "milter", "max_connections", d.max_connections),
        idle_timeout=r.positive(t, "milter", "idle_timeout", d.idle_timeout),
        socket_mode=mode,
    )


def _feedback(r: _Reader, t: Mapping[str, Any]) -> FeedbackSettings:
    r.check_keys("feedback", t, FeedbackSettings)
    d = FeedbackSettings()
    s = "feedback"
    share = r.positive(t, s, "reporter_share", d.reporter_share)
    if share > 1:
        raise r.fail("feedback.reporter_share", "must be at most 1")
    return FeedbackSettings(
        max_message_size=r.count(t, s, "max_message_size", d.max_message_size),
        max_entries=r.count(t, s, "max_entries", d.max_entries),
        max_age_days=r.count(t, s, "max_age_days", d.max_age_days),
        per_reporter_daily=r.count(t, s, "per_reporter_daily", d.per_reporter_daily),
        reporter_share=share,
        keep_bodies=r.get(t, s, "keep_bodies", bool, d.keep_bodies),
        http_listen=r.hostport(t, s, "http_listen", d.http_listen),
        http_token_file=_optional_path(r.get(t, s, "http_token_file", str, "")),
        ham_on_release=r.get(t, s, "ham_on_release", bool, d.ham_on_release),
        reputation_half_life_days=r.positive(
            t, s, "reputation_half_life_days", d.reputation_half_life_days
        ),
        reputation_per_reporter=r.count(t, s, "reputation_per_reporter", d.reputation_per_reporter),
        reputation_cache_seconds=r.seconds_or_off(
            t, s, "reputation_cache_seconds", d.reputation_cache_seconds
        ),
    )


def _prefix(r: _Reader, t: Mapping[str, Any], section: str, key: str, default: int) -> int:
    bits = 32 if key.startswith("ipv4") else 128
    value = r.get(t, section, key, int, default)
    if not 8 <= value <= bits:  # a /0 would make one key of the whole Internet
        raise r.fail(f"{section}.{key}", f"must be between 8 and {bits}")
    return value


def _greylist(r: _Reader, t: Mapping[str, Any]) -> GreylistSettings:
    s = "greylist"
    r.check_keys(s, t, GreylistSettings)
    d = GreylistSettings()
    auto = r.get(t, s, "auto_allow_after", int, d.auto_allow_after)
    if auto < 0:
        raise r.fail("greylist.auto_allow_after", "must be 0 (never) or more")
    settings = GreylistSettings(
        enabled=r.get(t, s, "enabled", bool, d.enabled),
        delay=r.positive(t, s, "delay", d.delay),
        retry_window=r.positive(t, s, "retry_window", d.retry_window),
        lifetime=r.positive(t, s, "lifetime", d.lifetime),
        ipv4_prefix=_prefix(r, t, s, "ipv4_prefix", d.ipv4_prefix),
        ipv6_prefix=_prefix(r, t, s, "ipv6_prefix", d.ipv6_prefix),
        auto_allow_after=auto,
        exempt_networks=_networks(r, t, s, "exempt_networks"),
        exempt_dmarc_pass=r.get(t, s, "exempt_dmarc_pass", bool, d.exempt_dmarc_pass),
        exempt_sender_domains=tuple(
            _domain(r, "greylist.exempt_sender_domains", v)
            for v in r.strings(t, s, "exempt_sender_domains", ())
        ),
    )
    if settings.lifetime < settings.delay + settings.retry_window:
        # a triplet that passed must outlive the wait that made it pass
        raise r.fail("greylist.lifetime", "must be at least delay + retry_window")
    return settings


def _bucket(r: _Reader, t: Mapping[str, Any], key: str, default: RateBucket) -> RateBucket:
    name = f"ratelimit.{key}"
    table = t.get(key, {})
    if not isinstance(table, dict):
        raise r.fail(name, "must be a table with rate and burst")
    r.check_keys(name, table, RateBucket)
    rate = r.get(table, name, "rate", float, default.rate)
    if not 0 <= rate < float("inf"):
        raise r.fail(f"{name}.rate", "must be 0 (off) or a positive number per minute")
    burst = r.count(table, name, "burst", default.burst)
    return RateBucket(rate, burst)


def _ratelimit(r: _Reader, t: Mapping[str, Any]) -> RateLimitSettings:
    s = "ratelimit"
    r.check_keys(s, t, RateLimitSettings)
    d = RateLimitSettings()
    return RateLimitSettings(
        client_ip=_bucket(r, t, "client_ip", d.client_ip),
        sender_domain=_bucket(r, t, "sender_domain", d.sender_domain),
        recipient=_bucket(r, t, "recipient", d.recipient),
        ipv6_prefix=_prefix(r, t, s, "ipv6_prefix", d.ipv6_prefix),
        exempt_networks=_networks(r, t, s, "exempt_networks"),
    )


def load_settings(path: Path = DEFAULT_CONFIG) -> Settings:
    """Read and validate a configuration file; raises ConfigError naming file and key."""
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(str(path), "", "file not found") from None
    except OSError as exc:
        raise ConfigError(str(path), "", f"cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), "", f"invalid TOML: {exc}") from None
    return settings_from_mapping(data, str(path))
