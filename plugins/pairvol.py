"""nbdkit plugin for pairvol volumes: a shell around :mod:`replicator.export`.

    nbdkit python plugins/pairvol.py volume=PATH     # serve one volume
    nbdkit python plugins/pairvol.py dir=DIR         # serve every volume in DIR by name

Export names are ``[NAME][@PVID]``; with ``@PVID`` the connection is refused unless the volume
carries that PVID (the access check).  Each callback is one call into a typed object; errors
set nbdkit's errno and are re-raised, never swallowed.
"""

import errno
import functools
import os
import sys

# nbdkit embeds /usr/bin/python3, which knows nothing of our venv: import the project from
# this file's own tree, wherever nbdkit was started.
_ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import nbdkit  # noqa: E402  (provided by nbdkit's embedded interpreter)

from replicator.export import Exporter  # noqa: E402

API_VERSION = 2

_exporter = Exporter()


def _errno_of(e: BaseException) -> int:
    err = getattr(e, "errno", None)
    return err if isinstance(err, int) and err > 0 else errno.EIO


def _reports_errno(fn):
    """Set nbdkit's errno from the exception and RE-RAISE it (returning would mean success)."""

    @functools.wraps(fn)
    def wrapper(*args):
        try:
            return fn(*args)
        except BaseException as e:
            nbdkit.set_error(_errno_of(e))
            raise

    return wrapper


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


@_reports_errno
def config(key, value):
    _exporter.config(key, value)


@_reports_errno
def config_complete():
    _exporter.config_complete()


@_reports_errno
def list_exports(readonly, is_tls):
    return _exporter.list_exports()


@_reports_errno
def default_export(readonly, is_tls):
    return _exporter.default_export()


@_reports_errno
def open(readonly):
    return _exporter.open(nbdkit.export_name(), readonly)


def close(h):
    h.close()


@_reports_errno
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
    return True


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_cache(h):
    return nbdkit.CACHE_NATIVE


def can_extents(h):
    return True


def is_rotational(h):
    return False


@_reports_errno
def pread(h, buf, offset, flags):
    h.pread(buf, offset)


@_reports_errno
def pwrite(h, buf, offset, flags):
    h.pwrite(buf, offset, bool(flags & nbdkit.FLAG_FUA))


@_reports_errno
def flush(h, flags):
    h.flush()


@_reports_errno
def trim(h, count, offset, flags):
    h.trim(count, offset, bool(flags & nbdkit.FLAG_FUA))


@_reports_errno
def zero(h, count, offset, flags):
    h.zero(count, offset, bool(flags & nbdkit.FLAG_MAY_TRIM), bool(flags & nbdkit.FLAG_FUA))


@_reports_errno
def cache(h, count, offset, flags):
    h.cache(count, offset)


@_reports_errno
def extents(h, count, offset, flags):
    return h.extents(count, offset, bool(flags & nbdkit.FLAG_REQ_ONE))
