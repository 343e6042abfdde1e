"""The command line: argument parsing (main.py) and the command bodies (scan, lab,
quarantine, train, evaluate).

The top layer: may import anything; nothing imports it.
"""
