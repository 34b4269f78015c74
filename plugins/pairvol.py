"""nbdkit plugin for pairvol volumes: a shell around :mod:`replicator.export`.

    nbdkit python plugins/pairvol.py volume=PATH     # serve one volume
    nbdkit python plugins/pairvol.py dir=DIR         # serve every volume in DIR by name
    nbdkit python plugins/pairvol.py dir=DIR node=NAME listen=ADDR [secret-file=F]
                                                     # a storage node (use `pairvol node start`)
        [tls-cert=F tls-key=F tls-ca=F]              # TLS on peer links (replicator/tls.py)

Export names are ``[NAME][@PVID]``; with ``@PVID`` the connection is refused unless the volume
carries that PVID (the access check).  Each callback is one call into a typed object; errors
set nbdkit's errno and are re-raised, never swallowed (returning after ``set_error`` would
report success to the client).

What the client sees when ``open`` fails: nbdkit 1.32 answers NBD_OPT_GO with
NBD_REP_ERR_UNKNOWN whatever errno the plugin set, so libnbd reports ENOENT ("server has no
export named ...") for a PVID mismatch and for an unknown export alike.  The errno we set
still matters for every other callback, and the reason (both PVIDs) is the one line nbdkit logs.
"""

import errno
import os
import sys

# nbdkit embeds /usr/bin/python3, which knows nothing of our venv: import the project from
# this file's own tree, wherever nbdkit was started, and the venv's own packages (PyPI's
# crc32c with its SSE4.2 code, not Debian's software-only one) ahead of the system's, exactly
# as .venv/bin/python (built from the same interpreter, --system-site-packages) sees them.
_ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
_VENV_SITE = os.path.join(
    _ROOT, ".venv", "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}", "site-packages"
)
for _p in (_VENV_SITE, _ROOT):
    if os.path.isdir(_p) and _p not in sys.path:
        sys.path.insert(0, _p)

import nbdkit  # noqa: E402  (provided by nbdkit's embedded interpreter)

from replicator.errors import PairvolError  # noqa: E402
from replicator.export import (  # noqa: E402
    INFLIGHT,
    IO_CACHE,
    IO_FLUSH,
    IO_READ,
    IO_ROWS,
    IO_TRIM,
    IO_WRITE,
    IO_ZERO,
    get_ident,
    io_row,
)
from replicator.node import Service  # noqa: E402

API_VERSION = 2

# Looked up once: the request callbacks are the hot path.
_FUA = nbdkit.FLAG_FUA
_MAY_TRIM = nbdkit.FLAG_MAY_TRIM
_REQ_ONE = nbdkit.FLAG_REQ_ONE


_service = Service()  # warnings (a damaged volume in dir=) go to stderr


def _failed(e):
    """Set nbdkit's errno from ``e``.  The caller must re-raise (a bare ``raise``)."""
    err = getattr(e, "errno", None)
    nbdkit.set_error(err if isinstance(err, int) and err > 0 else errno.EIO)
    if isinstance(e, PairvolError | OSError):
        # An expected failure whose message says it all (a PVID mismatch names both PVIDs).
        # Without a traceback nbdkit logs it as ONE line, "...: open: error: <message>", on
        # stderr or syslog, wherever nbdkit's log goes.  Bugs keep their traceback.
        e.with_traceback(None)


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key, value):
    try:
        _service.config(key, value)
    except BaseException as e:
        _failed(e)
        raise


def config_complete():
    try:
        _service.config_complete()
    except BaseException as e:
        _failed(e)
        raise


def after_fork():
    try:
        _service.after_fork(nbdkit.shutdown)
    except BaseException as e:
        _failed(e)
        raise


def cleanup():
    _service.cleanup()


def list_exports(readonly, is_tls):
    try:
        return _service.list_exports()
    except BaseException as e:
        _failed(e)
        raise


def default_export(readonly, is_tls):
    try:
        return _service.default_export()
    except BaseException as e:
        _failed(e)
        raise


def open(readonly):
    try:
        return _service.open(nbdkit.export_name(), readonly)
    except BaseException as e:
        _failed(e)
        raise


def close(h):
    h.close()


def export_description(h):
    return h.description()


def get_size(h):
    return h.size


def block_size(h):
    return h.block_size()


def can_write(h):
    return not h.readonly


def can_multi_conn(h):
    return True  # one file, and flush is fdatasync of that file: all connections agree


def can_flush(h):
    return True


def can_trim(h):
    return not h.readonly


def can_zero(h):
    return not h.readonly


def can_fast_zero(h):
    return True  # zero is a fallocate or EOPNOTSUPP, never a slow write of zeros


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_cache(h):
    return nbdkit.CACHE_NATIVE


def can_extents(h):
    return True


def is_rotational(h):
    return False


# The hot path (docs/benchmarks.md, "Inlining"): a plain volume's reads and writes go straight
# to the syscall; anything unusual (bounds, short transfers, a paired volume) takes the checked
# method, which raises the precise error.  A write publishes itself in INFLIGHT before it looks
# at ``h.plain``: a pair created under this connection waits for it (replicator/export.py).
# Every request is counted first (replicator/export.py, IO_ROWS): this thread's own row, two
# integer increments, no lock.
_preadv, _pwritev, _DSYNC = os.preadv, os.pwritev, os.RWF_DSYNC
_io_rows_get = IO_ROWS.get


def _count(op, n):
    c = _io_rows_get(get_ident()) or io_row()
    c[op] += 1
    c[op + 1] += n


def pread(h, buf, offset, flags):
    try:
        n = len(buf)
        c = _io_rows_get(get_ident()) or io_row()
        c[IO_READ] += 1
        c[IO_READ + 1] += n
        if not (
            h.plain
            and offset >= 0
            and offset + n <= h.size
            and _preadv(h.fd, (buf,), h.base + offset) == n
        ):
            h.pread(buf, offset)
    except BaseException as e:
        _failed(e)
        raise


def pwrite(h, buf, offset, flags):
    try:
        n = len(buf)
        fua = flags & _FUA != 0
        tid = get_ident()
        c = _io_rows_get(tid) or io_row()
        c[IO_WRITE] += 1
        c[IO_WRITE + 1] += n
        if h.plain:
            INFLIGHT[tid] = h
            try:
                if (
                    h.plain
                    and offset >= 0
                    and offset + n <= h.size
                    and _pwritev(h.fd, (buf,), h.base + offset, _DSYNC if fua else 0) == n
                ):
                    return
            finally:
                INFLIGHT[tid] = None
        h.pwrite(buf, offset, fua)
    except BaseException as e:
        _failed(e)
        raise


def flush(h, flags):
    try:
        _count(IO_FLUSH, 0)
        h.flush()
    except BaseException as e:
        _failed(e)
        raise


def trim(h, count, offset, flags):
    try:
        _count(IO_TRIM, count)
        h.trim(count, offset, flags & _FUA != 0)
    except BaseException as e:
        _failed(e)
        raise


def zero(h, count, offset, flags):
    try:
        _count(IO_ZERO, count)
        h.zero(count, offset, flags & _MAY_TRIM != 0, flags & _FUA != 0)
    except BaseException as e:
        _failed(e)
        raise


def cache(h, count, offset, flags):
    try:
        _count(IO_CACHE, count)
        h.cache(count, offset)
    except BaseException as e:
        _failed(e)
        raise


def extents(h, count, offset, flags):
    try:
        return h.extents(count, offset, flags & _REQ_ONE != 0)
    except BaseException as e:
        _failed(e)
        raise
