"""Images in prompt rows and requests: one reference (a ``data:`` URL, bare base64, a local path
or an ``s3://`` URI; ``http(s)://`` only where a caller allows it) read into an RGB image, and
images turned into the vision tower's pixel values.

Everything wrong with an image is a :class:`BadImage` whose message names what is wrong, so
distill counts and skips the row and the server answers 400 with it.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import posixpath
import re

DATA_URL = re.compile(r"^data:image/[a-zA-Z0-9.+-]+;base64,(.*)$", re.DOTALL)
DEFAULT_MAX_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_PIXELS = 4096 * 4096


class BadImage(ValueError):
    """An image reference that cannot be used (missing, not an image, too large, not allowed)."""


class ImageTooLarge(BadImage):
    """An image over a byte or pixel limit (a server tells it apart from one that is not an image)."""


def image_bytes(
    ref: str, *, max_bytes: int = DEFAULT_MAX_BYTES, allow_remote: bool = False, base_dir: str = ""
) -> bytes:
    """The encoded bytes an image reference points at. Relative paths are read from ``base_dir``."""
    if not isinstance(ref, str) or not ref:
        raise BadImage("image: expected a data URL, base64, a path or an s3:// URI")
    match = DATA_URL.match(ref)
    if match or _looks_base64(ref):
        data = _b64(match.group(1) if match else ref, max_bytes)
    elif ref.startswith(("http://", "https://")):
        if not allow_remote:
            raise BadImage("image: remote URLs are not allowed here (send a data URL, or enable allow_remote_images)")
        data = _fetch_url(ref, max_bytes)
    elif ref.startswith("data:"):
        raise BadImage("image: a data URL must be data:image/<type>;base64,<data>")
    else:
        data = _read(ref if ref.startswith("s3://") or os.path.isabs(ref) else os.path.join(base_dir, ref), max_bytes)
    if len(data) > max_bytes:
        raise ImageTooLarge(f"image: {len(data)} bytes is over the limit of {max_bytes}")
    return data


def resolve_ref(ref: str, base_dir: str) -> str:
    """``ref`` with a relative local path made absolute against ``base_dir`` (a local directory
    or an ``s3://`` prefix); every other kind of reference is returned as it is. A caller that
    hands references to another process resolves them first, where ``base_dir`` is known."""
    if not isinstance(ref, str) or not ref or not base_dir:
        return ref
    if DATA_URL.match(ref) or _looks_base64(ref) or ref.startswith(("data:", "http://", "https://", "s3://")):
        return ref
    if os.path.isabs(ref):
        return ref
    if base_dir.startswith("s3://"):
        return base_dir.rstrip("/") + "/" + posixpath.normpath(ref)
    return os.path.normpath(os.path.join(base_dir, ref))


def load_image(ref: str, *, max_bytes: int = DEFAULT_MAX_BYTES, allow_remote: bool = False, base_dir: str = ""):
    """The referenced image as an RGB ``PIL.Image``; :class:`BadImage` when it cannot be."""
    return decode(image_bytes(ref, max_bytes=max_bytes, allow_remote=allow_remote, base_dir=base_dir))


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > max_pixels:
            raise ImageTooLarge(f"image: {image.width}x{image.height} is over the limit of {max_pixels} pixels")
        image.load()
    except Image.DecompressionBombError as err:  # PIL's own guard, met before ours for huge headers
        raise ImageTooLarge(f"image: {err}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        if isinstance(err, BadImage):
            raise
        raise BadImage(f"image: not a readable image ({type(err).__name__})") from None
    return image.convert("RGB")


def _looks_base64(ref: str) -> bool:
    return len(ref) >= 64 and "/" not in ref[:8] and re.fullmatch(r"[A-Za-z0-9+/=\s]+", ref[:256]) is not None


def _b64(text: str, max_bytes: int) -> bytes:
    if len(text) * 3 // 4 > max_bytes:
        raise ImageTooLarge(f"image: about {len(text) * 3 // 4} bytes is over the limit of {max_bytes}")
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError):
        raise BadImage("image: invalid base64") from None


def _read(path: str, max_bytes: int) -> bytes:
    from sd2_ray import storage

    try:
        if path.startswith("s3://"):
            fs, inner = storage.filesystem(path)
            size = fs.get_file_info(inner).size
            if size is not None and size > max_bytes:
                raise ImageTooLarge(f"image: {path} has {size} bytes, over the limit of {max_bytes}")
            with fs.open_input_stream(inner) as f:
                return f.read()
        if os.path.getsize(path) > max_bytes:
            raise ImageTooLarge(f"image: {path} has {os.path.getsize(path)} bytes, over the limit of {max_bytes}")
        with open(path, "rb") as f:
            return f.read()
    except (FileNotFoundError, IsADirectoryError, PermissionError, OSError) as err:
        if isinstance(err, BadImage):
            raise
        raise BadImage(f"image: cannot read {path} ({type(err).__name__})") from None


def _fetch_url(url: str, max_bytes: int) -> bytes:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - allowed by config only
            data = response.read(max_bytes + 1)
    except OSError as err:
        raise BadImage(f"image: cannot fetch {url} ({type(err).__name__})") from None
    return data


def image_processor(config):
    """The CLIP preprocessing of a LLaVA config's vision tower (resize, centre crop, normalise);
    the PIL backend (no torchvision here)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    size = config.vision_config.image_size
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def pixel_values(images: list, processor):
    """(N, 3, H, W) float pixel values of N PIL images."""
    return processor(images=list(images), return_tensors="pt")["pixel_values"]
