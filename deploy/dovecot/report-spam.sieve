# Dovecot imapsieve: a message was copied, moved or appended into Junk.
# Tell the relay it is spam. Installed as /etc/dovecot/sieve/relay/report-spam.sieve and
# compiled with `sievec` (see README.md). The IMAP user name becomes the reporter, so the
# relay can count and, if need be, distrust one user's reports.
require ["vnd.dovecot.pipe", "copy", "imapsieve", "environment", "variables"];

set "reporter" "unknown";
if environment :matches "imap.user" "*" {
  set "reporter" "${1}";
}

# :copy keeps the message where the user put it; the pipe only reads it.
pipe :copy "relay-learn-spam" ["${reporter}"];
