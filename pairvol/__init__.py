"""The pairvol command line (``pairvol`` console script)."""
