"""Evaluation (METHOD §6): the judge classifier, the metrics and ``uniemo evaluate``.

Import-light on purpose: submodules (``judge``, ``metrics``, ``evaluate``, ``cli``, ``report``) load torch and
friends only when imported themselves.
"""
