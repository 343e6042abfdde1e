"""The milter front door: the Sendmail milter protocol (``wire``), one MTA connection
(``session``), header changes as milter actions (``edits``) and the listener
(``server``).

A second door onto the same pipeline as ``smtp/``: Postfix or Sendmail keep the SMTP
session, relay control, queueing and delivery; we decide and stamp. May import the value
objects, config, contracts and pipeline; never smtp, ops, lab, app or cli.
"""
