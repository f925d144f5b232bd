"""The wire contract shared by devices and cloud tools: names, topics, documents, manifests, bundles, signatures, the V2 codec.

Pure data and rules, no I/O beyond reading a file it is handed: the bottom layer of the agent.
``names`` (name/version/digest rules, anti-rollback), ``topics`` (every MQTT topic), ``protocol``
(Release, Rollout, DeviceState, artifacts), ``policy`` (rollout policy, cohorts, windows),
``manifest`` (model manifests), ``bundle`` (feature bundles), ``signing`` (Ed25519 over canonical
JSON), ``kserve_v2`` (the Open Inference Protocol codec).
"""
