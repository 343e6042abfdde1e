"""One pass over one message: facts -> verdict -> stamps -> action -> recorder -> delivery.

Owns the pass itself, the action table and the header stamps. May import the value
objects, config, contracts, facts and policy; never the SMTP layer, ops, lab, app or cli.
"""
