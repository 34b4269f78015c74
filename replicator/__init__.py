"""pairvol's storage side: volumes, PVIDs, the NBD export, and (later) bitmaps, journals and pairs."""
