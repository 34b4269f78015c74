"""pairvol's host side: the host PVID cache, block-device attachment, and (later) the cluster agent."""
