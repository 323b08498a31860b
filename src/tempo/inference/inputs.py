"""Inputs to predict on: a folder of images (torchvision ImageFolder layout, or flat), a .npy / .npz array,
or a built-in dataset's test split. Files are untrusted input: every one that cannot be read, or does
not fit the model, is refused with an error that names it.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, DatasetError
from .model import ModelSpec

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
ARRAY_KEYS = ("images", "inputs", "x")  # where a .npz keeps its images (or its only array)
LABEL_KEYS = ("labels", "y")
MAX_IMAGE_PIXELS = 64 << 20  # a decompression bomb is refused before it is decoded


@dataclass
class Inputs:
    """What predict reads: raw pixels (one [N, C, H, W] tensor, or one [C, H, W] per image file)."""

    pixels: Tensor | list[Path]  # an array's images, or image files decoded only when prepared
    ids: list[str]
    labels: Tensor | None = None  # class indices, when the source has them
    classes: list[str] | None = None  # ImageFolder class names (label i is classes[i])
    source: str = ""

    def __len__(self) -> int:
        return len(self.ids)

    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the first input: what the model takes when nothing else says."""
        first = self.pixels[0]
        return tuple((decode_image(first.read_bytes(), None, str(first)) if isinstance(first, Path) else first).shape)

    def batches(self, spec: ModelSpec, batch_size: int) -> Iterator[tuple[list[str], Tensor, Tensor | None]]:
        """(ids, model inputs, labels or None) for each batch of `batch_size`, prepared for `spec`."""
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))
            if isinstance(self.pixels, Tensor):
                x = spec.prepare(self.pixels[start:stop], what=f"{self.source} [{start}:{stop}]")
            else:
                x = torch.cat([spec.prepare(decode_image(p.read_bytes(), spec.channels, str(p)).unsqueeze(0),
                                            what=str(p)) for p in self.pixels[start:stop]])
            yield self.ids[start:stop], x, None if self.labels is None else self.labels[start:stop]


def read_inputs(path: Path) -> Inputs:
    """The inputs in an image folder or a .npy / .npz file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"--data {path} does not exist (give an image folder, a .npy / .npz file, or "
                          "fashion-mnist / cifar10 / synthetic)")
    if path.is_dir():
        return _image_folder(path)
    if path.suffix == ".npy":
        return _array_inputs(_load_npy(path), None, str(path))
    if path.suffix == ".npz":
        return _npz_inputs(path)
    raise ConfigError(f"--data {path}: not a folder, .npy or .npz file")


def decode_image(data: bytes, channels: int | None, what: str) -> Tensor:
    """uint8 [C, H, W] from an encoded image (PNG, JPEG, ...): grey for 1 channel, RGB for 3; `channels`
    None: as stored (grey stays grey, anything else becomes RGB)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise DatasetError(f"{what}: {image.width}x{image.height} pixels is too large an image")
            if channels is None:
                channels = 1 if image.mode in ("L", "I", "I;16", "F", "1") else 3
            if channels not in (1, 3):
                raise DatasetError(f"{what}: the model takes {channels}-channel inputs; images give 1 (grey) or 3")
            array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{what}: not a readable image ({' '.join(str(e).split())[:200]})") from None
    pixels = torch.from_numpy(array.copy())
    return pixels.unsqueeze(0) if pixels.dim() == 2 else pixels.permute(2, 0, 1)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _image_folder(folder: Path) -> Inputs:
    """ImageFolder layout (one subfolder of images per class, classes in sorted order) or a flat folder."""
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subfolders:
        loose = [p.name for p in folder.iterdir() if _is_image(p)]
        if loose:
            raise DatasetError(f"--data {folder} holds class subfolders and loose images ({', '.join(loose[:3])}): "
                               "use one layout (ImageFolder: every image in its class's subfolder)")
        classes = [p.name for p in subfolders]
        files = [(p, label) for label, sub in enumerate(subfolders) for p in sorted(sub.rglob("*")) if _is_image(p)]
    else:
        classes = None
        files = [(p, -1) for p in sorted(folder.iterdir()) if _is_image(p)]
    if not files:
        raise DatasetError(f"--data {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    labels = None if classes is None else torch.tensor([label for _, label in files])
    return Inputs([p for p, _ in files], [p.relative_to(folder).as_posix() for p, _ in files], labels, classes,
                  str(folder))


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DatasetError(f"cannot read {path}: {' '.join(str(e).split())[:200]}") from None


def _npz_inputs(path: Path) -> Inputs:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DatasetError(f"cannot read {path}: {' '.join(str(e).split())[:200]}") from None
    images = next((arrays[k] for k in ARRAY_KEYS if k in arrays), None)
    if images is None and len(arrays) == 1:
        images = next(iter(arrays.values()))
    if images is None:
        raise DatasetError(f"{path} holds arrays {sorted(arrays)}; name the images one of {list(ARRAY_KEYS)}")
    labels = next((arrays[k] for k in LABEL_KEYS if k in arrays), None)
    return _array_inputs(images, labels, str(path))


def _array_inputs(images: np.ndarray, labels: np.ndarray | None, source: str) -> Inputs:
    """Images [N, C, H, W] (or [N, H, W]: one channel), uint8 0..255 or float 0..1; labels [N] class indices."""
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or len(images) == 0:
        raise DatasetError(f"{source}: images must be shaped [N, C, H, W] or [N, H, W] with N >= 1, "
                           f"got {list(images.shape)}")
    if images.dtype != np.uint8 and images.dtype.kind != "f":
        raise DatasetError(f"{source}: images are {images.dtype}; give uint8 (0..255) or float (0..1) pixels")
    pixels = torch.from_numpy(np.ascontiguousarray(images) if images.dtype == np.uint8
                              else np.ascontiguousarray(images, dtype=np.float32))
    if labels is not None:
        if labels.shape != (len(images),) or labels.dtype.kind not in "iu":
            raise DatasetError(f"{source}: labels must be {len(images)} integers, got {labels.dtype} "
                               f"{list(labels.shape)}")
        labels = torch.from_numpy(labels.astype(np.int64))
    return Inputs(pixels, [str(i) for i in range(len(images))], labels, None, source)
