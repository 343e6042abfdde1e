"""Operations: Prometheus metrics (``instruments`` defines them, ``metrics`` observes,
``multiprocess`` for several workers), the HTTP endpoint (/metrics /healthz /readyz),
readiness checks, fact failures made visible (``faults``) and the shadow-verdict log.

Observers of the pipeline: may import the value objects, config and contracts; never the
SMTP layer, the pipeline's implementation, the lab or the app.
"""
