"""The networks: ``DALLE`` and its transformer, the ``CLIP`` that reranks, their configuration, and the
precision they run in."""
