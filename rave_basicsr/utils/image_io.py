"""Reading and writing the images users actually have: any bit depth, grey, palette, alpha, EXIF orientation.

Decoding uses OpenCV (``IMREAD_UNCHANGED`` keeps 16-bit data and alpha; palette and CMYK JPEGs come back as
BGR) and PIL only to read the EXIF orientation tag, which ``IMREAD_UNCHANGED`` ignores. Pixels come out as
float32 RGB in [0, 1]; alpha is kept separately so that it can be carried through enhancement untouched.
"""
import io
import os
from dataclasses import dataclass
from typing import Optional

import cv2
import numpy as np

from rave_basicsr.utils.errors import RaveError

#: extensions that the folder readers pick up (lower case)
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.pgm')

_EXIF_ORIENTATION_TAG = 274
_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


class ImageReadError(RaveError):
    """A file that is not a readable image; the message names it."""


@dataclass
class DecodedImage:
    """An image as float32 RGB in [0, 1] (H×W×3), its alpha (H×W, or None), its source bit depth (8 or 16) and
    its number of colour channels (1 for grey sources, whose RGB planes are equal; else 3)."""
    rgb: np.ndarray
    alpha: Optional[np.ndarray]
    bit_depth: int
    color_channels: int = 3


def is_image_file(path: str) -> bool:
    """True when the file name has one of :data:`IMAGE_EXTENSIONS`."""
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def _exif_orientation(data: bytes) -> int:
    if data.startswith(_PNG_SIGNATURE) and b'eXIf' not in data:
        # a PNG keeps EXIF in an eXIf chunk, which may follow the pixel data: PIL decodes the whole image to look
        # for it, which made every PNG read decode it twice (a third of the time of reading a 512-px PNG)
        return 1
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            return int(image.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except Exception:  # no EXIF, or a format PIL does not read: nothing to rotate
        return 1


def _apply_orientation(array: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1..8) to an H×W[×C] array."""
    if orientation in (2, 4, 5, 7):
        array = array[:, ::-1]
    if orientation in (3, 4):
        array = array[::-1, ::-1]
    elif orientation in (5, 6):
        array = np.rot90(array, k=-1)
    elif orientation in (7, 8):
        array = np.rot90(array, k=1)
    return np.ascontiguousarray(array)


def decode_image(data: bytes, name: str = '<bytes>', apply_exif_orientation: bool = True) -> DecodedImage:
    """Decode encoded image bytes to :class:`DecodedImage`; raises :class:`ImageReadError` naming ``name``."""
    if not data:
        raise ImageReadError(f'{name}: the file is empty (0 bytes).')
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None or array.size == 0:
        raise ImageReadError(f'{name}: not a readable image (corrupt, truncated or an unsupported format).')
    if array.dtype == np.uint8:
        bit_depth, scale = 8, 255.0
    elif array.dtype == np.uint16:
        bit_depth, scale = 16, 65535.0
    elif array.dtype == np.float32:
        bit_depth, scale = 16, 1.0
    else:
        raise ImageReadError(f'{name}: unsupported pixel type {array.dtype}; convert it to 8- or 16-bit.')
    array = array.astype(np.float32) / scale
    if array.ndim == 2:
        array = array[:, :, None]
    channels = array.shape[2]
    alpha = None
    if channels in (2, 4):
        alpha, array = array[:, :, -1], array[:, :, :-1]
    if array.shape[2] == 1:
        rgb = np.repeat(array, 3, axis=2)
    else:
        rgb = array[:, :, ::-1]  # OpenCV's BGR -> RGB
    if apply_exif_orientation:
        orientation = _exif_orientation(data)
        if orientation != 1:
            rgb = _apply_orientation(rgb, orientation)
            alpha = None if alpha is None else _apply_orientation(alpha, orientation)
    return DecodedImage(np.ascontiguousarray(np.clip(rgb, 0, 1)), alpha, bit_depth, 1 if channels <= 2 else 3)


def read_image(path: str, apply_exif_orientation: bool = True) -> DecodedImage:
    """Read an image file (see :func:`decode_image`); missing or unreadable files raise :class:`ImageReadError`."""
    try:
        with open(path, 'rb') as handle:
            data = handle.read()
    except OSError as exc:
        raise ImageReadError(f'{path}: cannot be read ({exc.strerror}).') from None
    return decode_image(data, name=str(path), apply_exif_orientation=apply_exif_orientation)


def encode_image(rgb: np.ndarray, extension: str, bit_depth: int = 8, alpha: Optional[np.ndarray] = None,
                 jpeg_quality: int = 95) -> bytes:
    """Encode float RGB in [0, 1] (H×W×3; or grey, H×W or H×W×1) and optional alpha as ``extension`` at 8 or 16
    bits per channel.

    Formats without 16-bit support (JPEG, WebP, BMP) are written at 8 bits; JPEG drops alpha.
    """
    extension = extension.lower() if extension.startswith('.') else '.' + extension.lower()
    if extension in ('.jpg', '.jpeg', '.webp', '.bmp'):
        bit_depth = 8
    if extension in ('.jpg', '.jpeg'):
        alpha = None
    scale, dtype = (65535.0, np.uint16) if bit_depth == 16 else (255.0, np.uint8)
    planes = np.clip(np.nan_to_num(rgb, nan=0.0, posinf=1.0, neginf=0.0), 0, 1)
    planes = planes[:, :, None] if planes.ndim == 2 else planes[:, :, ::-1]  # RGB -> OpenCV's BGR
    if alpha is not None:
        planes = np.concatenate([planes, np.clip(alpha, 0, 1)[:, :, None]], axis=2)
    array = np.round(planes * scale).astype(dtype)
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if extension in ('.jpg', '.jpeg') else []
    ok, buffer = cv2.imencode(extension, array, params)
    if not ok:
        raise RaveError(f'cannot encode an image as {extension}.')
    return buffer.tobytes()


def write_image_atomic(path: str, encoded: bytes) -> None:
    """Write encoded bytes to ``path`` through a temporary file and a rename, so no half-written file remains."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f'.{os.path.basename(path)}.{os.getpid()}.tmp')
    try:
        with open(temporary, 'wb') as handle:
            handle.write(encoded)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
