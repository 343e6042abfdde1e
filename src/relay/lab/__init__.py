"""Regulation lab: replay a labelled corpus through several regimes and report the costs.

corpus.py        read a split file / Maildir / mbox / directory; time order; unreadables
offline_auth.py  authentication facts from trusted Authentication-Results (DNS offline)
env.py           registry and services, rebuilt identically in every process
cache.py         SQLite cache: facts (digest, fact name + version, context), each
                 regime's decisions (regime key), the corpus's header values, tar
                 members' digests by archive stat, surveys that found every fact
compute.py       pass 1: stateless facts in a process pool; pass 2: stateful, in order
engine.py        where the passes run: that pool, or Dask tasks over batches (--engine dask)
shards.py        pass 2 as a key-sharded replay, exactly the ordered loop's values
evaluate.py      every policy over the cached facts with the relay's own engine
decide_pool.py   the regimes a rerun must decide, on forked processes, before the report
complete.py      every rule a message matches, past the engine's early stop (probes)
rescore.py       a verdict recomputed from matched rules (other thresholds, a rule removed)
curves.py        spam stopped against legitimate mail blocked over every score cutoff
rulestats.py     per rule: hits, S/O, overlap, marginal effect
shares.py        a share with its Wilson interval
stats.py         the report's numbers (Wilson intervals) as one JSON mapping
render.py, plots.py  Markdown, HTML and PNGs drawn from that JSON
tables.py        the HTML's message lists: first page inline, other pages and filters as
                 static files loaded on demand (file:// or HTTP)
render_curves.py, svgcurve.py  the curve and rule sections (inline SVG, no script)
run.py           one study from options to files, streamed (verdicts.jsonl, every
                 message; fact pages for the first rows of each list)
diff.py          `relay lab diff`: two reports, two regimes, or a shadow log, message by
                 message, with the rules responsible and paired intervals
tune.py          `relay lab tune`: rule scores and thresholds fitted to the train split
                 under a false-positive budget, cross-validated; the proposed policy file
                 keeps the original's comments and layout

Its command body is cli/lab.py. May import everything up to the front doors' layer
(assembly, pipeline, policy, facts, ops); never app or cli.
"""

from __future__ import annotations

from relay.lab.run import LabOptions, run_lab

__all__ = ["LabOptions", "run_lab"]
