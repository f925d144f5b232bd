"""A new version's health after activation: ``signals`` (p99 latency ratio, output PSI against the
previous version) and ``window`` (the watch loop, shared by the update machine and the local shadow).
"""
