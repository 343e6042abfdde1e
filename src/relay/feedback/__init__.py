"""Learned feedback: reports of "this is spam / ham / forget it" from people and tools.

Owns reading reported messages (``intake``), the stored value (``record``), the store
over the state layer's backends (``store``) and the training view that caps each
reporter's share (``store.training_set``). Imports config, message, secretkey, state and
the classifier's feature extraction; the HTTP endpoint (ops/learn.py) and the CLI
(cli/learn.py) sit above it. docs/feedback.md says what is stored and why.
"""
