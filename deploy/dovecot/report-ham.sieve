# Dovecot imapsieve: a message was copied or moved out of Junk.
# Tell the relay it is legitimate mail, unless it went to the Trash (deleting spam is not
# saying it was ham). Installed as /etc/dovecot/sieve/relay/report-ham.sieve and compiled
# with `sievec` (see README.md).
require ["vnd.dovecot.pipe", "copy", "imapsieve", "environment", "variables"];

if environment :matches "imap.mailbox" "*" {
  set "mailbox" "${1}";
}
if string :is "${mailbox}" ["Trash", "Deleted Messages", "Deleted Items"] {
  stop;
}

set "reporter" "unknown";
if environment :matches "imap.user" "*" {
  set "reporter" "${1}";
}

pipe :copy "relay-learn-ham" ["${reporter}"];
