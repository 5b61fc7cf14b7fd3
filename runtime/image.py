"""Image preprocessing for camera frames, files and PIL images, without torch.

The reference (the PyTorch pipeline the graphs are verified with) crops the
centre square and resizes it with PIL's antialiased bilinear (triangle) filter,
5-8 ms on a 1080p frame. Here a bilinear resize to twice the target followed by
a 2x2 area average (a box filter) takes about 0.6 ms. It is close, not equal:
on the sample photos at 1080p the mean difference is up to 3.7 grey levels and
the image embedding's cosine to the reference averages 0.99, dropping to about
0.94 on fine textures (grass, gravel). The tests bound both.

Deeper samples are brought to 8 bits by one rule: 16-bit images (numpy uint16,
Pillow modes ``I;16*``, and mode ``I`` whose values fit in 16 bits, as some
16-bit files open) are divided by 257, rounded (65535 → 255; negatives → 0);
mode ``F`` floats are taken as [0, 1] if their maximum is at most 1, else as
0-255, and clipped. 16-bit RGB(A) PNGs and TIFFs Pillow already opens as 8-bit.

Files and PIL images are untrusted. Their declared size (``im.size``, read from
the header without decoding) is checked against ``edgemm.limits.max_image_pixels``
before any pixel is decoded, and anything Pillow raises on a hostile file
(OSError, SyntaxError, struct.error, MemoryError, ...) becomes an ``InputError``.
Pillow has its own process-wide bomb check (``PIL.Image.MAX_IMAGE_PIXELS``: a
warning above it, an error above twice it) that runs inside ``Image.open``,
before edgemm can look. Turning it off around each open (``MAX_IMAGE_PIXELS =
None``, ``warnings.catch_warnings``) is not thread-safe, and turning it off for
good would strip users' own Pillow code of its protection. So edgemm leaves it
on and only ever raises it, to edgemm's limit, when a user raised that above
Pillow's: the user asked for bigger images. Images under both limits load
without a warning; one over them may get Pillow's warning before edgemm's error.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edgemm.runtime.errors import BackendError, InputError, MissingDependencyError, require
from edgemm.runtime.limits import LIMITS
from edgemm.runtime.manifest import ImagePreprocess

COLOR_ORDERS = ("bgr", "rgb")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})


def center_crop_box(height: int, width: int, fraction: float) -> tuple[int, int, int]:
    """(top, left, side) of the centred square kept before resizing; shared with the reference."""
    side = max(1, int(round(min(height, width) * fraction)))
    return (height - side) // 2, (width - side) // 2, side


# What Pillow has been seen to raise on hostile files (its fuzzing, and ours), besides DecompressionBombError.
_PILLOW_FAILURES = (OSError, SyntaxError, EOFError, struct.error, ValueError, TypeError, ArithmeticError,
                    LookupError, NotImplementedError)


def _scale16(a: np.ndarray) -> np.ndarray:
    """16-bit samples → uint8, value / 257 rounded (65535 → 255)."""
    return ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)


@contextmanager
def _decoding(where: str, problem: str, advice: str) -> Iterator[None]:
    """Whatever Pillow raises while opening or decoding → InputError naming the image and what to do."""
    from PIL import Image

    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < LIMITS.max_image_pixels:
        Image.MAX_IMAGE_PIXELS = LIMITS.max_image_pixels  # only ever raised (module docstring)
    try:
        yield
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # Pillow's check in Image.open
        raise InputError(f"{where}: {e} Pass a smaller image, or {LIMITS.hint('max_image_pixels')}.") from e
    except MemoryError as e:
        raise InputError(f"{where}: not enough memory to decode this image; pass a smaller image.") from e
    except _PILLOW_FAILURES as e:
        raise InputError(f"{where}: {problem} ({type(e).__name__}: {e}); {advice}") from e


def _pil_to_rgb(im: Any, where: str) -> np.ndarray:
    """An opened PIL image → RGB uint8 (H, W, 3); its declared size is checked before anything is decoded."""
    w, h = im.size
    if w * h == 0:
        raise InputError(f"{where}: image is empty ({w}x{h}).")
    if w * h > LIMITS.max_image_pixels:
        raise InputError(f"{where}: {w}x{h} is {w * h:,} pixels, more than the limit of "
                         f"{LIMITS.max_image_pixels:,}; pass a smaller image, or {LIMITS.hint('max_image_pixels')}.")
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im)
        if im.mode == "I" and a.max() > 65535:
            raise InputError(f"{where}: 32-bit integer pixels up to {a.max()} have no known range; "
                             "convert the image to 8 or 16 bits first.")
        return cv2.cvtColor(_scale16(np.maximum(a, 0)), cv2.COLOR_GRAY2RGB)
    if im.mode == "F":
        a = np.asarray(im)
        if not np.isfinite(a).all():
            raise InputError(f"{where}: the float image contains NaN or infinite pixels.")
        gray = np.clip(np.rint(a * (255.0 if a.max() <= 1.0 else 1.0)), 0, 255).astype(np.uint8)
        return cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)
    return np.asarray(im.convert("RGB"))


def _read_file(path: Path) -> np.ndarray:
    from PIL import Image

    if not path.exists():
        raise InputError(f"image file '{path}' does not exist.")
    if not path.is_file():
        raise InputError(f"image path '{path}' is not a file.")
    with _decoding(f"'{path}'", "could not be read as an image", "pass a JPEG, PNG, BMP, … file."):
        with Image.open(path) as im:
            return _pil_to_rgb(im, f"'{path}'")


def decode_image(data: bytes, where: str = "image") -> np.ndarray:
    """An encoded image (JPEG, PNG, BMP, WebP, … bytes, e.g. a request body) → RGB uint8 (H, W, 3).

    Raises:
        InputError: The bytes are no image Pillow can decode, or one larger than ``edgemm.limits.max_image_pixels``.
    """
    import io

    from PIL import Image

    if not data:
        raise InputError(f"{where}: the encoded image is empty (0 bytes).")
    with _decoding(where, "could not be decoded as an image", "send the bytes of a JPEG, PNG, BMP, … file."):
        with Image.open(io.BytesIO(data)) as im:
            return _pil_to_rgb(im, where)


def to_rgb(image: Any, color: str = "bgr", *, where: str = "image") -> np.ndarray:
    """Any supported image → contiguous RGB uint8 array (H, W, 3).

    Args:
        image: numpy uint8 (or uint16, scaled by 1/257) array (H, W), (H, W, 1),
            (H, W, 3) or (H, W, 4); a PIL image; a path to an image file; or an encoded image's bytes.
        color: Channel order of 3/4-channel arrays: ``"bgr"`` (OpenCV frames,
            the default) or ``"rgb"``. Files and PIL images carry their own.
        where: How to name this image in error messages.

    Raises:
        InputError: Unsupported type, dtype, shape or colour order; an unreadable file or PIL image;
            or one larger than ``edgemm.limits.max_image_pixels``.
    """
    if color not in COLOR_ORDERS:
        raise InputError(f"color must be one of {COLOR_ORDERS}, got {color!r}.")
    if isinstance(image, (str, os.PathLike)):
        return _read_file(Path(image))
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_image(bytes(image), where)
    if not isinstance(image, np.ndarray):
        try:
            from PIL import Image
        except ImportError:  # pragma: no cover - pillow is a dependency
            Image = None
        if Image is not None and isinstance(image, Image.Image):
            with _decoding(where, "the PIL image could not be decoded", "its file may be truncated or damaged."):
                return _pil_to_rgb(image, where)
        raise InputError(
            f"{where}: expected a numpy array, a PIL image or a file path, got {type(image).__name__}."
        )
    if image.dtype.kind == "u" and image.dtype.itemsize == 2:
        image = _scale16(image)
    elif image.dtype != np.uint8:
        raise InputError(
            f"{where}: expected dtype uint8 (0-255) or uint16 (0-65535), got {image.dtype}. Convert first, e.g. "
            "np.clip(img * 255, 0, 255).astype(np.uint8) for floats in [0, 1]."
        )
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
        raise InputError(
            f"{where}: expected shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {image.shape}."
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise InputError(f"{where}: image is empty (shape {image.shape}).")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB if color == "bgr" else cv2.COLOR_RGBA2RGB)
    return np.ascontiguousarray(image[:, :, ::-1]) if color == "bgr" else image


class ImagePreprocessor:
    """Turns images into the image graph's normalised NCHW float32 batch.

    Args:
        spec: The manifest's image preprocessing.
    """

    def __init__(self, spec: ImagePreprocess):
        self.spec = spec  # its colour order and resize mode were checked with the manifest
        self.size = int(spec.size)
        self.squash = spec.resize == "squash"
        # Folded so one multiply-add per pixel does (x - mean) / std.
        self._scale = (1.0 / np.asarray(spec.std, np.float32)).reshape(1, 1, 3)
        self._shift = (-np.asarray(spec.mean, np.float32) / np.asarray(spec.std, np.float32)).reshape(1, 1, 3)

    def resize(self, image: np.ndarray) -> np.ndarray:
        """Centre-crop (or squash) and resize an (H, W, C) uint8 array to (size, size, C), keeping channel order."""
        size = self.size
        if self.squash:
            h, w = image.shape[:2]
            shrink = h > size and w > size
            return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        top, left, side = center_crop_box(image.shape[0], image.shape[1], self.spec.crop_fraction)
        crop = image[top : top + side, left : left + side]
        if side > 2 * size:
            crop = cv2.resize(crop, (2 * size, 2 * size), interpolation=cv2.INTER_LINEAR)
            return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
        if side > size:
            return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
        return cv2.resize(crop, (size, size), interpolation=cv2.INTER_LINEAR)

    def __call__(self, images: Sequence[Any], color: str = "bgr", *, first_index: int = 0) -> np.ndarray:
        """Preprocess a batch.

        Args:
            images: Images as accepted by :func:`to_rgb`.
            color: Channel order of 3/4-channel arrays (``"bgr"`` or ``"rgb"``).
            first_index: Index of ``images[0]`` in the caller's whole list, so
                errors name the image the caller passed, not its place in a batch.

        Returns:
            float32 array (N, 3, size, size).

        Raises:
            InputError: An empty batch or an unusable image (the message names its index).
        """
        if len(images) == 0:
            raise InputError("no images given; pass at least one image.")
        batch = np.empty((len(images), 3, self.size, self.size), np.float32)
        for i, image in enumerate(images):
            batch[i] = self._one(image, color, first_index + i)
        return batch

    def _one(self, image: Any, color: str, index: int) -> np.ndarray:
        """One image as a normalised (3, size, size) float32 array."""
        if _is_frame(image) and color in COLOR_ORDERS:
            # Camera-frame fast path: resize first, reorder channels on the small image.
            small = self.resize(image)
            rgb = small[:, :, ::-1] if color == "bgr" else small
        else:
            rgb = self.resize(to_rgb(image, color, where=f"image {index}"))
        return (rgb.astype(np.float32) * self._scale + self._shift).transpose(2, 0, 1)


def _is_frame(image: Any) -> bool:
    """A camera frame as OpenCV gives it: a non-empty (H, W, 3) uint8 array."""
    return (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
            and image.shape[0] > 0 and image.shape[1] > 0)


_PREPROCESS_GRAPH = Path(__file__).resolve().parent / "data" / "preprocess_frame.onnx"
_PROVIDERS = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


class DevicePreprocessor(ImagePreprocessor):
    """An :class:`ImagePreprocessor` that resizes and normalises camera frames on the GPU.

    On a GPU the image graph takes 1-2 ms, and resizing a 1080p frame on the CPU
    took as long again. Here a frame's centre crop travels to the device as uint8
    and one small ONNX graph (``runtime/data/preprocess_frame.onnx``, written by
    ``scripts/make_preprocess_graph.py``) does the same bilinear resize to twice
    the size, 2x2 mean and normalisation as the CPU path, rounding to whole grey
    levels after each resize as OpenCV does (OpenCV's fixed-point weights leave
    some pixels one level apart).
    Images that path does not cover stay on the CPU, as before: files, PIL images,
    other dtypes, ``squash`` resizing, and crops no more than twice the model's
    input (a 448-pixel crop for 224), where the CPU's own resize is cheap.
    Consecutive frames of one shape go to the device together.

    Args:
        spec: The manifest's image preprocessing.
        provider: ``"cuda"``, or ``"cpu"`` (the same graph on ONNX Runtime's CPU, for tests).

    Raises:
        BackendError: ONNX Runtime has no such provider, or it failed to start.
    """

    def __init__(self, spec: ImagePreprocess, provider: str = "cuda"):
        super().__init__(spec)
        ort = require("onnxruntime", "gpu", "Preprocessing frames on the GPU")
        full = _PROVIDERS.get(provider)
        if full is None or full not in ort.get_available_providers():
            raise BackendError(
                f"preprocessing on '{provider}' needs ONNX Runtime's {full or provider} provider, which this "
                f"onnxruntime lacks (it has {ort.get_available_providers()}); install edgemm[gpu] in place of the "
                "CPU onnxruntime, or preprocess on the CPU with ImagePreprocessor."
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # the CPU work left is a few small copies
        chosen = [(full, {"arena_extend_strategy": "kSameAsRequested"}) if provider == "cuda" else full]
        try:
            self.session = ort.InferenceSession(str(_PREPROCESS_GRAPH), sess_options=options, providers=chosen)
        except Exception as e:  # onnxruntime's own untyped errors
            raise BackendError(f"onnxruntime could not load the preprocessing graph: {e}") from e
        if self.session.get_providers()[0] != full:
            raise BackendError(f"onnxruntime: the {full} did not start for the preprocessing graph (the session got "
                               f"{self.session.get_providers()}; ONNX Runtime's log above says why).")
        self.provider = provider
        shape = (1, 3, 1, 1)
        self._feeds = {
            "scale": self._scale.reshape(shape).astype(np.float32),
            "shift": self._shift.reshape(shape).astype(np.float32),
        }
        self._channels = {"bgr": np.array([2, 1, 0], np.int64), "rgb": np.array([0, 1, 2], np.int64)}

    def _crop(self, image: Any, color: str) -> np.ndarray | None:
        """The frame's centre crop (a view) when it goes to the device; None when the CPU path is kept."""
        if self.squash or color not in COLOR_ORDERS or not _is_frame(image):
            return None
        top, left, side = center_crop_box(image.shape[0], image.shape[1], self.spec.crop_fraction)
        return image[top : top + side, left : left + side] if side > 2 * self.size else None

    def __call__(self, images: Sequence[Any], color: str = "bgr", *, first_index: int = 0) -> np.ndarray:
        if len(images) == 0:
            raise InputError("no images given; pass at least one image.")
        batch = np.empty((len(images), 3, self.size, self.size), np.float32)
        crops = [self._crop(image, color) for image in images]
        i = 0
        while i < len(images):
            crop = crops[i]
            if crop is None:
                batch[i] = self._one(images[i], color, first_index + i)
                i += 1
                continue
            j = i + 1
            while j < len(images) and crops[j] is not None and crops[j].shape == crop.shape:
                j += 1
            frames = np.ascontiguousarray(crop[None]) if j == i + 1 else np.stack(crops[i:j])
            feeds = {"frame": frames, "channels": self._channels[color],
                     "sizes": np.array([j - i, 3, 2 * self.size, 2 * self.size], np.int64), **self._feeds}
            try:
                batch[i:j] = self.session.run(["pixels"], feeds)[0]
            except Exception as e:  # onnxruntime's own untyped errors (out of device memory, say)
                raise BackendError(f"onnxruntime: preprocessing images {first_index + i}-{first_index + j - 1} "
                                   f"on '{self.provider}' failed: {e}") from e
            i = j
        return batch


def frame_preprocessor(spec: ImagePreprocess, providers: Sequence[str]) -> ImagePreprocessor:
    """The preprocessor for a model whose image graph runs on ``providers``.

    A :class:`DevicePreprocessor` when that is an NVIDIA GPU (``"cuda"`` or
    ``"tensorrt"`` first) and ONNX Runtime has its CUDA provider; otherwise the
    CPU's :class:`ImagePreprocessor`. ``EDGEMM_PREPROCESS=cpu`` keeps the CPU's.
    """
    wanted = os.environ.get("EDGEMM_PREPROCESS", "auto")
    if wanted not in ("auto", "cpu"):
        raise BackendError(f"EDGEMM_PREPROCESS must be 'auto' or 'cpu', got {wanted!r}.")
    if wanted == "auto" and providers and providers[0] in ("cuda", "tensorrt"):
        try:
            ort = require("onnxruntime", "gpu", "Preprocessing frames on the GPU")
        except MissingDependencyError:  # the native TensorRT backend runs without onnxruntime
            return ImagePreprocessor(spec)
        if _PROVIDERS["cuda"] in ort.get_available_providers():
            return DevicePreprocessor(spec, "cuda")
    return ImagePreprocessor(spec)
