"""The SMTP front door: the protocol (``server``) and its aiosmtpd hooks (``handler``),
MAIL/RCPT parsing (``paths``), relay control, DATA read into one buffer (``data``), the
smuggling watch, the memory budget for large messages (``budget``), XFORWARD, the open
sessions, the listening socket and the worker supervisor.

Owns everything that speaks SMTP to clients and the processes that share the port. May
import the value objects, config, contracts, delivery and pipeline; never ops, lab, app
or cli (the supervisor receives its worker entry point instead of importing the app).
"""
