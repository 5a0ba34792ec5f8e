"""A multipart/form-data parser for intake: the whole (size-capped) body is split with ``bytes.find``.

Starlette's streaming parser calls back into Python for every header and chunk; intake needs the whole
image in memory anyway, so reading the body first and cutting it at its delimiters costs a fifth of the CPU.
The format is RFC 7578 (RFC 2046 framing): an optional preamble, ``--boundary`` lines between parts, each
part's headers and a blank line before its bytes, and ``--boundary--`` at the end.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

from python_multipart.multipart import parse_options_header
from starlette.requests import Request

from moderation.errors import InvalidInput, PayloadTooLarge, RequestTimeout

_CRLF = b"\r\n"
_BLANK_LINE = b"\r\n\r\n"
# Longest header block of one part, and most parts, this parser accepts.
MAX_PART_HEADER_BYTES = 8 * 1024
MAX_PARTS = 20


class MultipartError(InvalidInput):
    """The body is not well-formed multipart/form-data."""

    code = "invalid_multipart"
    status_code = 400


@dataclass(frozen=True)
class FormPart:
    """One part of a form: its field name, file name (for files), content type and bytes."""

    name: str
    filename: str | None
    content_type: str | None
    data: bytes

    @property
    def is_file(self) -> bool:
        """Whether the part was sent as a file (its Content-Disposition names a file)."""
        return self.filename is not None


async def read_body(request: Request, limit: int, *, too_large: str, timeout: float) -> bytes:
    """The request body, read up to ``limit`` bytes within ``timeout`` seconds.

    PayloadTooLarge beyond the limit (also without Content-Length), RequestTimeout when it takes longer.
    """
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):  # one deadline for the whole body, however many chunks
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(too_large)
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {timeout:g} s") from None
    return b"".join(chunks)


def boundary_of(content_type: str) -> bytes:
    """The boundary parameter of a multipart Content-Type header."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    # RFC 2046: 1 to 70 characters.
    if not boundary or len(boundary) > 70:
        raise MultipartError("multipart Content-Type needs a boundary parameter of 1 to 70 characters")
    return boundary


def _part(body: bytes, start: int, end: int) -> FormPart:
    """Parse the part in ``body[start:end]``: header lines, a blank line, the bytes."""
    if body.startswith(_CRLF, start):  # no headers at all
        raise MultipartError("a multipart part has no Content-Disposition header")
    split = body.find(_BLANK_LINE, start, min(end, start + MAX_PART_HEADER_BYTES) + len(_BLANK_LINE))
    if split < 0 or split + len(_BLANK_LINE) > end:
        raise MultipartError("a multipart part's headers are missing their end or are too long")
    disposition: bytes | None = None
    content_type: bytes | None = None
    for line in body[start:split].split(_CRLF):
        name, colon, value = line.partition(b":")
        if not colon:
            raise MultipartError("a multipart part has a malformed header line")
        header = name.strip().lower()
        if header == b"content-disposition":
            disposition = value.strip()
        elif header == b"content-type":
            content_type = value.strip()
    if disposition is None:
        raise MultipartError("a multipart part has no Content-Disposition header")
    kind, params = parse_options_header(disposition)
    field = params.get(b"name")
    if kind != b"form-data" or field is None:
        raise MultipartError("a multipart part's Content-Disposition is not form-data with a name")
    filename = params.get(b"filename")
    if filename is None and b"filename*" in disposition.lower():
        filename = b""  # only an RFC 2231 encoded name (which senders should not use): still a file
    try:
        return FormPart(
            name=field.decode("utf-8"),
            filename=None if filename is None else filename.decode("utf-8"),
            content_type=None if content_type is None else content_type.decode("latin-1"),
            data=body[split + len(_BLANK_LINE) : end],
        )
    except UnicodeDecodeError as exc:
        raise MultipartError("a multipart part's field or file name is not UTF-8") from exc


def _next_line(body: bytes, lines: re.Pattern[bytes], needle: bytes, start: int) -> re.Match[bytes] | None:
    """The next delimiter line from ``start`` on."""
    # bytes.find is several times faster than the expression's search on ordinary bodies; after a few
    # look-alikes (data that repeats the delimiter) the expression takes over, so a crafted body costs
    # no Python loop per look-alike.
    found = body.find(needle, start)
    for _ in range(8):
        if found < 0:
            return None
        line = lines.match(body, found)
        if line is not None:
            return line
        found = body.find(needle, found + 1)
    return lines.search(body, found) if found >= 0 else None


def parse_form(body: bytes, boundary: bytes) -> dict[str, FormPart]:
    """The parts of a multipart/form-data body by field name; MultipartError when it is malformed."""
    delimiter = b"--" + boundary
    # A delimiter line: a line break, the delimiter, then "--" (the close delimiter) or transport padding
    # and a line break. One expression finds them all in C, however many look-alikes the data holds.
    lines = re.compile(re.escape(_CRLF + delimiter) + rb"(--|[ \t]*\r\n)")
    opening = re.match(re.escape(delimiter) + rb"(--|[ \t]*\r\n)", body)
    if opening is None:  # a preamble, ignored, before the first delimiter line
        opening = lines.search(body)
        if opening is None:
            raise MultipartError("the body holds no multipart delimiter line for the given boundary")
    parts: dict[str, FormPart] = {}
    previous = opening
    while previous.group(1) != b"--":
        following = _next_line(body, lines, _CRLF + delimiter, previous.end())
        if following is None:
            raise MultipartError("the multipart body is truncated: a part has no closing delimiter")
        if len(parts) == MAX_PARTS:
            raise MultipartError(f"the multipart body has more than {MAX_PARTS} parts")
        part = _part(body, previous.end(), following.start())
        if part.name in parts:
            raise MultipartError(f"the multipart field {part.name!r} is given more than once")
        parts[part.name] = part
        previous = following
    return parts
