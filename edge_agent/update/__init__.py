"""The update lifecycle of models and feature bundles on a device.

- ``states``: the state enum (on-disk names), the one transitions table, the resume map, records.
- ``machine``: ``UpdateMachine``, which runs a record through the table, saving before each step.
- ``installers``: what each step does to a model or a feature bundle.
- ``seams``: the typed Protocols the machine is handed (store, server, fetcher, validator, clocks).
- ``admission``: the one, pure release admission (also used by ``cloud_batch.sim``).
- ``validate``: candidate validation in a child process.
- ``coordinator``: ``OtaAgent``, MQTT intake, with ``gate`` (rollouts), ``lanes`` and ``reports``.
"""
