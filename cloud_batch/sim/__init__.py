"""The fleet simulator: ``fleet.SimFleet`` runs many ``device.SimDevice`` on one ``loop.EventLoop``.

Devices admit releases with the agent's own ``edge_agent.update.admission`` and report its
``update.states.State`` names and results.
"""
