"""The text chunks of a PNG (tEXt, zTXt, iTXt) and its eXIf block, read without decoding a single pixel.

PIL's ``PngImageFile.text`` and ``getexif()`` decode the whole image first (text chunks may follow the image
data), so reading the metadata of a 10000x10000 PNG whose IDAT is a zlib bomb cost ~0.5 GB and seconds, and a
huge declared size raised PIL's DecompressionBombError. Here the chunk list is walked and image data skipped.

Limits are PIL's (PngImagePlugin.MAX_TEXT_CHUNK per decompressed chunk, MAX_TEXT_MEMORY for all text), plus a
bound on the number of chunks. A damaged text chunk (bad CRC, bad zlib stream, over a limit) or a truncated
file is a BadInputError naming the file: the caller turns it into exit 3. Chunk layout: PNG specification
(W3C, 3rd edition), sections 5.3 and 11.3.3.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from sdcli.runtime.errors import BadInputError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_TEXT_CHUNK = 1 << 20  # bytes of one decompressed zTXt/iTXt value (PIL's MAX_TEXT_CHUNK)
MAX_TEXT_MEMORY = 64 << 20  # bytes of all text values together (PIL's MAX_TEXT_MEMORY)
MAX_CHUNKS = 1_000_000  # a 1 GB PNG in 8 KB IDAT chunks has ~130k
TEXT_TYPES = (b"tEXt", b"zTXt", b"iTXt")


def is_png(head: bytes) -> bool:
    return head.startswith(PNG_SIGNATURE)


def read_png_text(path: str | Path) -> tuple[dict[str, str], bytes | None]:
    """({keyword: text} of every text chunk, the raw eXIf payload or None). A later chunk with the same
    keyword wins, as in PIL."""
    path = Path(path)
    texts: dict[str, str] = {}
    exif = None
    used = 0
    try:
        with open(path, "rb") as f:
            if f.read(8) != PNG_SIGNATURE:
                raise BadInputError(f"{path}: not a PNG file")
            for _ in range(MAX_CHUNKS):
                kind, data = _next_chunk(path, f)
                if kind == b"IEND":
                    return texts, exif
                if kind == b"eXIf" and exif is None:
                    exif = data
                elif kind in TEXT_TYPES:
                    key, value = _decode_text(path, kind, data)
                    used += len(value)
                    if used > MAX_TEXT_MEMORY:
                        raise BadInputError(f"{path}: over {MAX_TEXT_MEMORY >> 20} MB of PNG text chunks")
                    if key is not None:
                        texts[key] = value
    except OSError as e:
        raise BadInputError(f"{path}: cannot read ({e.strerror or e})") from None
    raise BadInputError(f"{path}: more than {MAX_CHUNKS} PNG chunks")


def complete_png_size(path: str | Path) -> tuple[int, int] | None:
    """(width, height) of a PNG that is whole: IHDR first, every chunk's CRC right, IEND last and nothing after
    it; None for anything else (cut short, damaged, not a PNG). Reads the file once, decodes no pixel: what
    --skip-existing asks of a file before it takes it for a finished image."""
    try:
        with open(path, "rb") as f:
            if f.read(8) != PNG_SIGNATURE:
                return None
            size = None
            for n in range(MAX_CHUNKS):
                head = f.read(8)
                if len(head) < 8:
                    return None
                length, kind = struct.unpack(">I4s", head)
                if length > 0x7FFFFFFF or (n == 0) != (kind == b"IHDR"):
                    return None
                crc = zlib.crc32(kind)
                for left in range(length, 0, -(1 << 20)):
                    piece = f.read(min(left, 1 << 20))
                    if not piece:
                        return None
                    crc = zlib.crc32(piece, crc)
                    if kind == b"IHDR" and size is None and len(piece) >= 8:
                        size = struct.unpack(">II", piece[:8])
                stored = f.read(4)
                if len(stored) < 4 or struct.unpack(">I", stored)[0] != crc:
                    return None
                if kind == b"IEND":
                    return size if f.read(1) == b"" else None
    except OSError:
        return None
    return None


def _next_chunk(path: Path, f) -> tuple[bytes, bytes | None]:
    """(type, data) of the next chunk; data only for the chunks we read (text, eXIf), the rest is skipped."""
    head = f.read(8)
    if len(head) == 0:
        return b"IEND", None  # the file ends at a chunk boundary without IEND: keep what was read
    if len(head) < 8:
        raise BadInputError(f"{path}: truncated PNG (a chunk header is cut off)")
    length, kind = struct.unpack(">I4s", head)
    if length > 0x7FFFFFFF:  # the specification's limit
        raise BadInputError(f"{path}: broken PNG (chunk {kind.decode('latin-1')!r} claims {length} bytes)")
    if kind not in TEXT_TYPES and kind != b"eXIf":
        f.seek(length + 4, 1)  # data and CRC, never read
        return kind, None
    if length > MAX_TEXT_MEMORY:
        raise BadInputError(f"{path}: PNG {kind.decode('latin-1')} chunk of {length} bytes is over the "
                            f"{MAX_TEXT_MEMORY >> 20} MB text limit")  # fmt: skip
    data, crc = f.read(length), f.read(4)
    if len(data) < length or len(crc) < 4:
        raise BadInputError(f"{path}: truncated PNG (the {kind.decode('latin-1')} chunk is cut off)")
    if zlib.crc32(kind + data) != struct.unpack(">I", crc)[0]:
        raise BadInputError(f"{path}: broken PNG (bad CRC in the {kind.decode('latin-1')} chunk)")
    return kind, data


def _inflate(path: Path, key: str, data: bytes) -> bytes:
    """zlib data, at most MAX_TEXT_CHUNK bytes once expanded (a small chunk can expand to gigabytes)."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, MAX_TEXT_CHUNK + 1)
    except zlib.error as e:
        raise BadInputError(f"{path}: PNG text chunk {key[:80]!r} is not valid zlib data ({e})") from None
    if len(out) > MAX_TEXT_CHUNK:
        raise BadInputError(f"{path}: PNG text chunk {key[:80]!r} expands past {MAX_TEXT_CHUNK >> 20} MB "
                            "(a decompression bomb?)")  # fmt: skip
    return out


def _decode_text(path: Path, kind: bytes, data: bytes) -> tuple[str | None, str]:
    """(keyword, text) of one text chunk; keyword None for a chunk PIL would skip (an iTXt that is not
    UTF-8, an unknown compression method)."""
    raw_key, _, rest = data.partition(b"\0")
    key = raw_key.decode("latin-1")
    if kind == b"tEXt":
        return key, rest.decode("latin-1")
    if kind == b"zTXt":
        if rest[:1] != b"\0":
            return None, ""
        return key, _inflate(path, key, rest[1:]).decode("latin-1")
    compressed, method, rest = rest[:1], rest[1:2], rest[2:]  # iTXt
    _language, _, rest = rest.partition(b"\0")
    _translated, _, text = rest.partition(b"\0")
    if compressed == b"\1":
        if method != b"\0":
            return None, ""
        text = _inflate(path, key, text)
    try:
        return key, text.decode("utf-8")
    except UnicodeDecodeError:
        return None, ""
