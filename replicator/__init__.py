"""pairvol storage side: volumes, PVIDs, the NBD export, later bitmaps and journals."""
