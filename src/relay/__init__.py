"""relay: a spam-filtering SMTP relay for testing spam regulation."""

__version__ = "0.1.0"
