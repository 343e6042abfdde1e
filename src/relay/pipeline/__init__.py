"""One pass over one message: facts -> verdict -> stamps -> action -> recorder -> delivery.

Owns the pass itself, the action table and the header stamps. May import the value
objects, config, contracts, facts, policy and models (the classifier holder); never the
SMTP layer, ops, lab, app or cli.
"""
