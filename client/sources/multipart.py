"""An incremental reader of ``multipart/related`` bodies (RFC 2046), as WADO-RS sends them."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from email.message import Message

from ..errors import PacsError

__all__ = ["boundary_of", "iter_parts"]


def boundary_of(content_type: str) -> bytes:
    """The ``boundary`` parameter of a ``multipart/...`` Content-Type header.

    Raises
    ------
    PacsError
        Not a multipart type, or no boundary.
    """
    header = Message()
    header["Content-Type"] = content_type
    boundary = header.get_param("boundary")
    if not header.get_content_maintype() == "multipart" or not isinstance(boundary, str) or not boundary:
        raise PacsError(f"expected a multipart/related answer with a boundary, got {content_type!r}")
    return boundary.encode("ascii")


def _body(segment: bytes) -> bytes:
    """A part's body: the segment after its boundary line and header block."""
    eol = segment.find(b"\r\n")  # end of the boundary line (transport padding may precede it)
    rest = segment[eol + 2:] if eol >= 0 else b""
    if rest.startswith(b"\r\n"):  # no headers
        return rest[2:]
    end = rest.find(b"\r\n\r\n")
    if end < 0:
        raise PacsError("malformed multipart answer: a part without the blank line after its headers")
    return rest[end + 4:]


def iter_parts(chunks: Iterable[bytes], boundary: bytes) -> Iterator[bytes]:
    """Yield each part's body as soon as it is complete; memory holds about one part.

    Parameters
    ----------
    chunks : iterable of bytes
        The body, in chunks of any size (e.g. ``response.iter_bytes()``).
    boundary : bytes
        From :func:`boundary_of`.

    Raises
    ------
    PacsError
        The body ends before its closing delimiter.
    """
    delimiter = b"\r\n--" + boundary
    buf = bytearray(b"\r\n")  # so that a delimiter at the very start is found like the others
    seen_first = False
    search_from = 0
    for chunk in chunks:
        buf += chunk
        while True:
            at = buf.find(delimiter, search_from)
            if at < 0:
                search_from = max(0, len(buf) - len(delimiter) + 1)
                break
            if seen_first and not buf.startswith(b"--"):
                yield _body(bytes(buf[:at]))
            seen_first = True
            del buf[: at + len(delimiter)]
            search_from = 0
    if not seen_first or not buf.startswith(b"--"):
        raise PacsError("the multipart answer ended before its closing boundary (truncated transfer)")
