"""A speed path for JPEGs already at the model's input size: decoded by torchvision's libjpeg-turbo.

On small images Pillow's per-image work (opening the file, identifying the format, the EXIF
transpose, the RGB conversion) costs more than decoding the pixels: on 10,000 CIFAR-10 JPEGs of
32 x 32 pixels it takes about 1.8 s where ``torchvision.io.decode_jpeg`` takes about 0.9 s
(docs/PERFORMANCE.md). Both decode with libjpeg-turbo (integer IDCT, fancy upsampling), and the
pixels are identical: on the CIFAR-10 test set, the 1,000 ImageNet sample photos and re-encodings
of them at every chroma subsampling, baseline and progressive (``tests/test_sources_jpeg.py``).
torchvision 0.29 deprecates its image decoders in favour of TorchCodec; where they are gone the
path gives way and Pillow decodes every file, as it did before.

Only where nothing else would change the pixels: a 3-channel JPEG (YCbCr or RGB) without an APP1
segment (EXIF or XMP: either can carry the orientation that Pillow's reading applies), of the one
size the model's image steps keep as it is (``ChunkedTransform.kept_size``: no resize, no crop),
within the pixel limit. Only files named as JPEGs are tried, so that no other file is opened
twice; a model whose steps keep no size never tries (the loader asks first). Everything else
(grey or CMYK JPEGs, metadata, large photos, other formats, and any file torchvision cannot
decode: truncated, corrupt) goes to Pillow as before, which also words the reason a file is
skipped.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import NamedTuple

import torch

_SOI = b"\xff\xd8"
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0-7: markers without a length
_NOT_FRAMES = frozenset({0xC4, 0xC8, 0xCC})  # DHT, JPG, DAC share the SOF range
JPEG_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif"})
"""The file names the speed path tries (any other file goes to Pillow without being opened here)."""


class JpegHeader(NamedTuple):
    height: int
    width: int
    components: int
    app1: bool
    """An APP1 segment (EXIF or XMP metadata) came before the frame header."""


def jpeg_header(data: bytes) -> JpegHeader | None:
    """The frame's size and components, and whether an APP1 segment came before it; None if
    ``data`` is not a JPEG whose segments can be walked to a frame header."""
    if not data.startswith(_SOI):
        return None
    position, app1 = 2, False
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _STANDALONE:
            position += 2
            continue
        (length,) = struct.unpack(">H", data[position + 2:position + 4])
        segment = data[position + 4:position + 2 + length]
        app1 = app1 or marker == 0xE1
        if 0xC0 <= marker <= 0xCF and marker not in _NOT_FRAMES:
            if len(segment) < 6:
                return None
            _, height, width, components = struct.unpack(">BHHB", segment[:6])
            return JpegHeader(height, width, components, app1)
        if marker == 0xDA or length < 2:  # scan data before any frame header: not a valid JPEG
            return None
        position += 2 + length
    return None


HEADER_BYTES = 65536
"""The file's first bytes read to find the frame header (an APP segment is at most 64 KB; a file
whose header lies further is read by Pillow)."""


def fast_jpeg_pixels(path: Path, kept_size: tuple[int, int], max_pixels: int | None) -> torch.Tensor | None:
    """(H, W, 3) uint8 pixels of the JPEG at ``path`` through the speed path, or None where Pillow
    must read it. ``kept_size``: the (width, height) the model's image steps leave as it is."""
    if path.suffix.lower() not in JPEG_SUFFIXES:
        return None
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None
    try:
        with path.open("rb") as file:
            data = file.read(HEADER_BYTES)
            header = jpeg_header(data)
            if header is None or header.app1 or header.components != 3 or not header.height or not header.width:
                return None
            if max_pixels and header.height * header.width > max_pixels:
                return None
            if (header.width, header.height) != kept_size:
                return None
            data += file.read()
    except OSError:
        return None
    try:
        pixels = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)
    except RuntimeError:
        return None
    if pixels.shape != (3, header.height, header.width):
        return None
    return pixels.permute(1, 2, 0).contiguous()


__all__ = ["HEADER_BYTES", "JPEG_SUFFIXES", "JpegHeader", "fast_jpeg_pixels", "jpeg_header"]
