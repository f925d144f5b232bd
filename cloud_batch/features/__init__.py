"""Feature sets on the cloud side: tables → snapshot bundles in the registry → signed releases.

Modules: ``tables`` (reading and checking a table of features), ``recipes`` (features computed
from raw history), ``build`` (the feature registry and snapshot versions), ``delta`` (deltas and
partition bundles derived from snapshots) and ``push`` (signed releases published to a fleet).
"""
