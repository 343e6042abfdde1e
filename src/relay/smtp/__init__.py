"""The SMTP front door: server protocol, MAIL/RCPT parsing, relay control, worker supervisor.

Owns everything that speaks SMTP to clients and the processes that share the port. May
import the value objects, config, contracts, delivery and pipeline; never ops, lab, app
or cli (the supervisor receives its worker entry point instead of importing the app).
"""
