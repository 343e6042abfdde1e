#!/bin/sh
# Dovecot sieve pipe program: reads one message on stdin and records it as ham in the
# relay's feedback store. Called by report-ham.sieve with the IMAP user as $1.
# Installed as /usr/local/lib/relay/dovecot/relay-learn-ham.sh, mode 0755; Dovecot runs it
# as the relay user through the relay-learn-ham service (90-relay-imapsieve.conf).
#
# Edit the three paths below for your installation (tests/test_dovecot.py rewrites them).
RELAY=/opt/relay/bin/relay
RELAY_CONFIG=/etc/relay/relay.toml
# Relative paths in the config (var/, models/) are taken from here, as under systemd.
RELAY_DIR=/var/lib/relay

# Best effort: a non-zero exit makes Dovecot log the failed pipe; the IMAP COPY/MOVE has
# already succeeded and is never undone. The relay's own message goes to stderr, which
# Dovecot writes to its log ("relay-learn-ham: Error: ...").
cd "$RELAY_DIR" || exit 75
exec "$RELAY" learn --ham --source imapsieve --reporter "${1:-unknown}" --config "$RELAY_CONFIG" -
