"""The SpamAssassin public corpus as ../shared/corpora/spamassassin holds it: the five
tarballs every benchmark that reads the whole corpus extracts (split.tsv names which
messages are train and test)."""

from __future__ import annotations

TARBALLS = (
    "20030228_easy_ham.tar.bz2",
    "20030228_easy_ham_2.tar.bz2",
    "20030228_hard_ham.tar.bz2",
    "20030228_spam.tar.bz2",
    "20050311_spam_2.tar.bz2",
)
