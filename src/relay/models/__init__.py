"""Model versions: update a model from feedback, gate it, keep versions, swap them live.

``update.py`` trains a candidate (the base model unchanged + a site model learned from the
feedback vectors + a combiner, calibrated on held-out data) and scores its gates;
``registry.py`` keeps one folder per version, the ``CURRENT`` pointer and the history;
``holder.py`` is the classifier in force in a running relay, swapped atomically on reload.

May import the classifier, feedback and the layers below them; nothing above.
"""
