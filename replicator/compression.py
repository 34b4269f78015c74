"""Compression of bulk payloads on peer links (issue 12, item 6): the codecs, no I/O.

Theory of operation
-------------------
A pair may ask for its volume data to cross the link compressed (``pair create --compress
zstd|lz4``; ``none`` is the default).  This module is the codec table and the two pure
functions around it:

* :func:`pack` compresses a bulk field, or returns None when compression does not pay: the
  field is small, a sample of it does not shrink (random or already-compressed data costs a
  few microseconds, not a full pass), or the whole result does not save at least
  1/:data:`MIN_SAVING` of it.  The sender then sends the field raw.
* :func:`unpack` decompresses what a peer sent into exactly the size the frame declares, or
  raises one :class:`~replicator.errors.ProtocolError` (corrupt data, trailing bytes, a
  different size, a size over the limit: a decompression bomb never allocates more than the
  frame's limit).

Which frames carry compressed fields, and how a node tells its peer what it decodes (feature
bits of the handshake's Hello), is :mod:`replicator.wire`'s business; docs/protocol.md,
"Compression", documents both.  zstd frames carry their content size and no checksum (the
frame's CRC32C covers the compressed bytes); lz4 sends a raw block (its size is in the
message).  Both compressors are deterministic, so a frame we make encodes the same way twice.

A codec whose library is missing is simply not :func:`available`: the node does not offer
it, so its peers send it raw frames.
"""

from __future__ import annotations

import threading
from typing import Any, Final

from replicator.errors import ProtocolError, UsageError

try:
    import zstandard as _zstd
except ImportError:  # pragma: no cover - Debian's python3-zstandard is installed by tools/setup
    _zstd = None  # type: ignore[assignment]
try:
    import lz4.block as _lz4
except ImportError:  # pragma: no cover - Debian's python3-lz4 is installed by tools/setup
    _lz4 = None

NONE: Final = "none"
ZSTD: Final = "zstd"
LZ4: Final = "lz4"
#: The choices of ``--compress``, in the order of their frame codes.
CODECS: Final = (NONE, ZSTD, LZ4)
#: The codec field of a frame's flags (bits 0-1): code -> codec (3 is reserved).
CODE: Final[dict[str, int]] = {NONE: 0, ZSTD: 1, LZ4: 2}
BY_CODE: Final[dict[int, str]] = {v: k for k, v in CODE.items()}
CODE_MASK: Final = 0x0003
#: Hello.features bit of each codec: "I decode frames compressed with it".
FEATURE: Final[dict[str, int]] = {ZSTD: 1 << 1, LZ4: 1 << 2}

ZSTD_LEVEL: Final = 1  # fast: a link, not an archive (docs/benchmarks.md, issue 12 item 6)
#: Fields shorter than this go raw (one 512-byte block still compresses; headers dominate).
MIN_SIZE: Final = 512
#: A field of at least this size is sampled first: SAMPLE bytes at its start and its middle.
SAMPLE_FROM: Final = 32 * 1024
SAMPLE: Final = 4096
#: Compressed data must save at least 1/MIN_SAVING of the field (else the peer's
#: decompression is CPU spent for nothing); a sample must save 1/SAMPLE_SAVING.
MIN_SAVING: Final = 32
SAMPLE_SAVING: Final = 8


_AVAILABLE: Final = frozenset(
    {NONE} | ({ZSTD} if _zstd is not None else set()) | ({LZ4} if _lz4 is not None else set())
)


def available() -> frozenset[str]:
    """The codecs this process can encode and decode (``none`` always)."""
    return _AVAILABLE


def features(codecs: frozenset[str]) -> int:
    """The Hello feature bits that offer ``codecs``."""
    return sum(FEATURE[c] for c in codecs if c in FEATURE)


def codecs_of(bits: int) -> frozenset[str]:
    """The codecs the feature bits offer (``none`` always; unknown bits are ignored)."""
    return frozenset({NONE} | {c for c, bit in FEATURE.items() if bits & bit})


def check_codec(name: object, where: str = "this node") -> str:
    """A codec name (UsageError if it is not one, or ``where`` lacks its library)."""
    if not isinstance(name, str) or name not in CODECS:
        raise UsageError(f"--compress {name!r} is not one of {', '.join(CODECS)}")
    if name not in available():
        raise UsageError(f"--compress {name}: {where} has no {name} library installed")
    return name


# --------------------------------------------------------------------------------------------
# The codecs.  zstd's (de)compressor objects are not safe to share between threads: one each.

_local = threading.local()
#: What the libraries raise on bad input (all of it becomes one ProtocolError).
_CORRUPT: Final[tuple[type[Exception], ...]] = (
    ValueError,
    TypeError,
    *((_zstd.ZstdError,) if _zstd is not None else ()),
    *((_lz4.LZ4BlockError,) if _lz4 is not None else ()),
)


def _zstd_compressor() -> Any:
    c = getattr(_local, "zc", None)
    if c is None:
        c = _local.zc = _zstd.ZstdCompressor(
            level=ZSTD_LEVEL, write_checksum=False, write_content_size=True, write_dict_id=False
        )
    return c


def _zstd_decompressor() -> Any:
    d = getattr(_local, "zd", None)
    if d is None:
        d = _local.zd = _zstd.ZstdDecompressor()
    return d


def _compress(codec: str, data: bytes | memoryview) -> bytes:
    if codec == ZSTD:
        out: bytes = _zstd_compressor().compress(data)
        return out
    out = _lz4.compress(data, store_size=False)
    return out


def pack(codec: str, data: bytes | memoryview) -> bytes | None:
    """``data`` compressed with ``codec``, or None: send it raw (``none``, too small, or it
    does not compress)."""
    n = len(data)
    if codec == NONE or n < MIN_SIZE:
        return None
    if codec not in available():
        raise ProtocolError(f"codec {codec!r} is not available", remote=False)
    view = memoryview(data).cast("B") if isinstance(data, memoryview) else data
    if n >= SAMPLE_FROM:
        mid = n // 2
        if not any(
            len(_compress(codec, s)) <= SAMPLE - SAMPLE // SAMPLE_SAVING
            for s in (view[:SAMPLE], view[mid : mid + SAMPLE])
        ):
            return None
    packed = _compress(codec, view)
    return packed if len(packed) <= n - n // MIN_SAVING - 1 else None


def unpack(codec: str, data: bytes | memoryview, size: int, *, limit: int, what: str) -> bytes:
    """Decompress a peer's ``data`` (``codec``) into exactly ``size`` bytes, at most
    ``limit``; ProtocolError naming ``what`` (the field) otherwise."""
    if size > limit:
        raise ProtocolError(f"{what}: {codec} data of {size} bytes is over the {limit}-byte limit")
    if codec not in available() or codec == NONE:
        raise ProtocolError(f"{what}: codec {codec!r} cannot be decoded here")
    try:
        out = _unzstd(data, size, what) if codec == ZSTD else _unlz4(data, size)
    except ProtocolError:
        raise
    except _CORRUPT as e:
        raise ProtocolError(f"{what}: corrupt {codec} data ({_one_line(e)})") from None
    if len(out) != size:
        raise ProtocolError(f"{what}: {codec} data gives {len(out)} bytes, not {size}")
    return out


def _unzstd(data: bytes | memoryview, size: int, what: str) -> bytes:
    declared = _zstd.frame_content_size(data)  # a frame we would make says its size
    if declared != size:
        shown = "no size" if declared < 0 else f"{declared} bytes"
        raise ProtocolError(f"{what}: zstd frame declares {shown}, the message {size}")
    d = _zstd_decompressor().decompressobj(write_size=max(size, 1))
    out: bytes = d.decompress(data)
    if not d.eof:
        raise ProtocolError(f"{what}: zstd frame is truncated")
    if d.unused_data:
        raise ProtocolError(f"{what}: {len(d.unused_data)} bytes after the zstd frame")
    return out


def _unlz4(data: bytes | memoryview, size: int) -> bytes:
    out: bytes = _lz4.decompress(data, uncompressed_size=size)
    return out


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 120 else text[:117] + "..."
