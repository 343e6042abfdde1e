"""Policy engine: policy files over lazy, privacy-tiered facts -> Verdict.

    load_policy(path, registry) -> Policy       validate + compile (PolicyError lists all)
    compile_policy(text, registry, source)      the same from text
    check_files(paths, registry) -> [problems]  `relay policy check`
    Policy.decide(message, facts) -> Verdict    the pipeline's Decider
    reload_policy(holder, path, registry, observer) -> bool   SIGHUP handler body

The file format, evaluation order and early stop are described in docs/policy.md.

May import the value objects, config, contracts and facts (the registry it validates
against); never the pipeline, the SMTP layer or anything above.
"""

from __future__ import annotations

from relay.policy.engine import Policy
from relay.policy.loader import check_files, compile_policy, load_policy
from relay.policy.model import Override, RuleSpec, Thresholds
from relay.policy.reload import reload_policy, signal_reload

__all__ = [
    "Override",
    "Policy",
    "RuleSpec",
    "Thresholds",
    "check_files",
    "compile_policy",
    "load_policy",
    "reload_policy",
    "signal_reload",
]
