"""Self-update of the agent itself (#11): A/B slots, the installer the update machine drives, the watch in the
running agent that confirms or reverts, the hidden self-test and boot commands, and the health rule."""
