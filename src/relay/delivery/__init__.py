"""Where accepted mail goes: transports (SMTP downstream, Maildir, memory), durable writes,
and the quarantine as a place mail is kept.

May import the value objects, config and contracts; nothing above them.
"""
