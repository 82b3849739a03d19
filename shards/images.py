"""The one place images are decoded: `prepare` checks them, `shard` re-encodes them, readers
decode shard bytes. A file PIL cannot read never raises out of here; callers get a reason
string, count it and treat the item as having no image."""
from __future__ import annotations

import io
import struct
from pathlib import Path

from PIL import Image

# Everything PIL raises for a bad file: OSError (UnidentifiedImageError, "image file is
# truncated"), SyntaxError and struct.error / EOFError / IndexError from plugin parsers,
# ValueError, and the decompression-bomb guard (an Exception, and a Warning when warnings are
# errors).
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error,
                Image.DecompressionBombError, Image.DecompressionBombWarning)

IMAGE_CHECKS = ("header", "full", "none")


def _guarded(action):
    """(action(), None), or (None, "<error class>: <message>") when PIL cannot read the image."""
    try:
        return action(), None
    except IMAGE_ERRORS as e:
        return None, f"{type(e).__name__}: {e}"


def _load_rgb(source: str | Path | bytes) -> Image.Image:
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
        return img.convert("RGB")


def _verify(path: str | Path) -> str:
    with Image.open(path) as img:
        fmt = img.format
        img.verify()
    return fmt


def decode_rgb(source: str | Path | bytes) -> tuple[Image.Image | None, str | None]:
    """Fully decode a file path or encoded bytes to RGB: (image, None), or (None, reason)."""
    return _guarded(lambda: _load_rgb(source))


def _ends_with_eoi(path: str | Path) -> bool:
    with open(path, "rb") as f:
        f.seek(0, io.SEEK_END)
        f.seek(max(0, f.tell() - 64))
        return f.read().rstrip(b"\x00\r\n\t ").endswith(b"\xff\xd9")


def check_image(path: str | Path, how: str = "header") -> str | None:
    """None when the image file is readable, else the reason.

    header: parse the header (`Image.open` + `verify`, which checks PNG chunk CRCs); a JPEG
            that does not end with its end-of-image marker (a cut-off download) is fully
            decoded to decide. Cheap: pixel data is not decoded otherwise.
    full:   the header check, then decode every pixel (slow on large datasets).
    none:   no check; `shard` still counts what it cannot decode.
    """
    if how not in IMAGE_CHECKS:
        raise ValueError(f"image check must be one of {', '.join(IMAGE_CHECKS)}, got {how!r}")
    if how == "none":
        return None
    fmt, reason = _guarded(lambda: _verify(path))
    if reason:
        return reason
    if how == "full" or (fmt == "JPEG" and not _ends_with_eoi(path)):
        return decode_rgb(path)[1]
    return None
