"""Where accepted mail goes: transports (``smtp`` downstream, ``maildir``, ``memory``), the
mapping of downstream answers to our replies, durable writes, and the quarantine as a
place mail is kept. A transport opens one Transaction per SMTP transaction.

May import the value objects, config and contracts; nothing above them.
"""
