"""``cloud-batch``: ``main`` (train, register, list), ``ota`` (keys, release, rollout, fleet), ``features`` (build, push), ``common``."""
