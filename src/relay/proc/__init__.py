"""Process plumbing: child processes fed over pipes by the event loop, and children that
die with their parent.

May import nothing of the project but the value objects.
"""
