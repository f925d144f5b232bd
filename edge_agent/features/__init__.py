"""The on-device feature cache and request-time joins.

``cache`` (``FeatureCache``: SQLite WAL, TTL at read, bounded), ``plan`` (the one bundle admission
rule: newer, delta base, schema, bound), ``schema`` (SQL and migrations), ``writer`` (rows of one
bundle), ``records`` (what reads return), ``join`` (fill model inputs for an entity), ``precomputed``
(answer from an entity's batch-scored outputs before running the model).
"""
