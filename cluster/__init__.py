"""pairvol host side: the host PVID cache, block-device attachment, later the agent."""
