"""Explicit feedback (METHOD §5): a Ray actor pool that generates emotional images, filters them and writes the
kept ones back as training shards.

- :mod:`uniemo.feedback.filtering`: the filter's steps 1-4 as pure functions (no Ray).
- :mod:`uniemo.feedback.actors`: the model bundle, generator/filter actors, the shard writer, the pool.
- :mod:`uniemo.feedback.rounds`: one round end to end (:func:`uniemo.feedback.rounds.run_round`).
- :mod:`uniemo.feedback.loop`: rounds and continued training, sequential or async (``uniemo feedback``,
  :func:`uniemo.feedback.loop.run_feedback`).
"""
