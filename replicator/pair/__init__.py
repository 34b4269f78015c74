"""The pair runtime: the adapter around :class:`~replicator.pair_state.PairMachine` in a node.

Theory of operation
-------------------
A storage node owns every volume in its directory, so one
:class:`~replicator.pair.manager.PairManager` in the node's process holds one
:class:`~replicator.pair.side.Side` per pair whose local half lives here.  A side is the pure
state machine plus what it needs to act: the volume (opened read-write), its persistent
difference and copy bitmaps (:class:`~replicator.bitmap_store.BitmapStore`), the activity log,
a client to the peer node, and the copy engine.  Nothing here decides *what* may happen; the
machine does (``docs/state-machines.md``).  This package carries out its actions.

The modules, one room each (docs/architecture.md has the map):

* :mod:`.manager`: every side of the node, the peer clients, the ticker, peer requests;
* :mod:`.side`: one side: firing events, carrying out actions, facts from link and disk;
* :mod:`.client_io`: the client write path (policy per write) and the client handles;
* :mod:`.handles`: open connections per volume, rebound when the volume's role changes;
* :mod:`.replica`: what a peer sends a secondary;
* :mod:`.exchange`: the state exchange with the peer (fencing on a newer epoch);
* :mod:`.copy_engine`: initial copy, resync and swap copies;
* :mod:`.activity_log`: the primary's activity log;
* :mod:`.create`, :mod:`.commands`: the two-sided commands;
* :mod:`.verify`, :mod:`.display`: online verify and ``pair display``;
* :mod:`.doc`: the side's persisted document; :mod:`.names`: pair ids and peer addresses;
* :mod:`.quarantine`: what cannot be loaded, and what a crash left half done.

Persistence.  Each side's record lives in ``DIR/.pairvol/pairs/GROUP@PAIR.pair`` (a
checksummed two-slot record).  The machine asks for ``PersistState`` before anything that
depends on it reaches disk or the peer; a new PVID goes on the volume before the record that
may reveal it.

Link.  A failed request, or the machine's heartbeat timeout, is ``LinkLost``.  While a side's
link is down the node's ticker pings the peer every second; a Pong is ``LinkRestored``, and
the sides exchange their states (:mod:`.exchange`).
"""
