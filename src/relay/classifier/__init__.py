"""The spam classifier: features, model card and audited loading, serving, training,
evaluation.

May import the value objects, config, the corpus reader and proc; never facts, policy or
anything above them (facts/classifier.py adapts it to the pipeline).
"""
