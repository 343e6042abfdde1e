"""Sender authentication: DKIM, SPF, DMARC and ARC, and the results the facts expose.

Owns the checks (dkimpy's rules, OpenSSL for the signature maths in a child process fed
over pipes) and their result values. May import the value objects, message, config,
dns and proc; never facts, policy or anything above (facts/auth.py adapts it).
"""
