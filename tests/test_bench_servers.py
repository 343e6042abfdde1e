"""bench/servers.py: what bench results record of a path."""

from __future__ import annotations

from bench.servers import REPO, repo_relative


def test_paths_are_recorded_without_this_machines_layout() -> None:
    assert repo_relative(REPO / "models" / "spam.skops") == "models/spam.skops"
    # The corpora beside the repository keep their place (docs give them so).
    shared = REPO.parent / "shared" / "corpora" / "spamassassin"
    assert repo_relative(shared) == "../shared/corpora/spamassassin"
    # A scratch file further out says only its name.
    scratch = REPO.parent.parent / "bench-b" / "stacks.txt"
    assert repo_relative(scratch) == "(outside the repository)/stacks.txt"
