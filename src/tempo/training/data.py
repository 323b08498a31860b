"""Datasets for training runs: Fashion-MNIST, CIFAR-10 and synthetic images.

Files on disk are untrusted input: the IDX reader checks every header field against the file's
length, and CIFAR-10's pickles go through an unpickler that can build numpy arrays and nothing
else. Images are kept as stored (uint8) and padded/resized and normalised per item, so a large
``--image-size`` never materialises the whole dataset at that size.
"""

from __future__ import annotations

import gzip
import math
import pickle
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import ConfigError, DatasetError
from .config import DEFAULT_FASHION_MNIST_DIR, DatasetName

NATIVE_SIZE = {DatasetName.FASHION_MNIST: 28, DatasetName.CIFAR10: 32}
SYNTHETIC_SIZES = (10_000, 2_000)  # train, test samples when no subset size is given
PATCH_MULTIPLE = 16  # image sizes ViTs accept for both patch 4 (timm, small images) and 16 (torchvision)

# --------------------------------------------------------------------------------------------
# IDX (the MNIST family's format): magic 0x0000 | dtype code | ndim, then ndim big-endian u32
# dimensions, then the data in row-major order.

_IDX_DTYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: Path, *, remedy: str = "download it again") -> np.ndarray:
    """The array stored in an IDX file (gzip-compressed when the name ends in .gz)."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"dataset file {path} does not exist; {remedy}") from None
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"cannot read {path}: {e}. The file is corrupt or truncated; {remedy}") from None
    return parse_idx(raw, name=str(path), remedy=remedy)


def parse_idx(raw: bytes, *, name: str, remedy: str = "download it again") -> np.ndarray:
    """Parse IDX bytes, refusing any header that does not describe exactly the bytes that follow."""

    def corrupt(detail: str) -> DatasetError:
        return DatasetError(f"{name} is not a valid IDX file: {detail}; {remedy}")

    if len(raw) < 4:
        raise corrupt(f"only {len(raw)} bytes")
    zero, code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or code not in _IDX_DTYPES:
        raise corrupt(f"bad magic number 0x{raw[:4].hex()}")
    if not 1 <= ndim <= 4:
        raise corrupt(f"{ndim} dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise corrupt(f"header truncated ({len(raw)} of {header} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_DTYPES[code]
    expected = header + math.prod(dims) * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise corrupt(f"{what}: dimensions {list(dims)} need {expected} bytes, the file has {len(raw)}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


_FASHION_INSTALL = ("install it (apt-get install dataset-fashion-mnist) or pass --data-dir with the folder "
                    "holding the four *-ubyte.gz files")
_FASHION_REPAIR = ("reinstall it (apt-get install --reinstall dataset-fashion-mnist) or pass --data-dir with "
                   "intact copies")


def _idx_file(folder: Path, stem: str) -> Path:
    """``stem.gz`` or, as torchvision leaves them, the uncompressed ``stem``."""
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    raise DatasetError(f"Fashion-MNIST file {folder / (stem + '.gz')} is missing; {_FASHION_INSTALL}")


def load_fashion_mnist(folder: Path) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """((train images, labels), (test images, labels)); images uint8 [N, 1, 28, 28]."""
    if not folder.is_dir():
        raise DatasetError(f"Fashion-MNIST folder {folder} does not exist; {_FASHION_INSTALL}")
    splits = []
    for split in ("train", "t10k"):
        images_path, labels_path = _idx_file(folder, f"{split}-images-idx3-ubyte"), \
            _idx_file(folder, f"{split}-labels-idx1-ubyte")
        images, labels = read_idx(images_path, remedy=_FASHION_REPAIR), read_idx(labels_path, remedy=_FASHION_REPAIR)
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
            raise DatasetError(f"{images_path} holds {images.dtype} {list(images.shape)}, expected uint8 "
                               f"[N, 28, 28] images; {_FASHION_REPAIR}")
        if labels.dtype != np.uint8 or labels.shape != (len(images),):
            raise DatasetError(f"{labels_path} holds {labels.dtype} {list(labels.shape)}, expected "
                               f"{len(images)} uint8 labels to match {images_path.name}; {_FASHION_REPAIR}")
        if labels.size and labels.max() > 9:
            raise DatasetError(f"{labels_path} holds label {labels.max()}, but Fashion-MNIST has 10 classes; "
                               f"{_FASHION_REPAIR}")
        splits.append((torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))))
    return splits[0], splits[1]


# --------------------------------------------------------------------------------------------
# CIFAR-10, python version: pickled dicts {data: uint8 [N, 3072], labels: [N ints], ...}.

def _allowed_globals() -> dict[tuple[str, str], object]:
    """The only globals a CIFAR batch references: how numpy rebuilds an ndarray and its dtype.

    The batches were written by an old numpy under ``numpy.core``; numpy 2 writes ``numpy._core``.
    Both names map to the reconstruct function of the numpy installed here.
    """
    reconstruct = np.empty(0).__reduce__()[0]
    return {("numpy.core.multiarray", "_reconstruct"): reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): reconstruct,
            ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}


class CifarUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, lists, dicts, strings and numbers; refuses every other global.

    A pickle can name any importable callable (``os.system``...) and have it called on load;
    this unpickler only resolves the names in :func:`_allowed_globals`.
    """

    def __init__(self, file, *, source: str):
        super().__init__(file, encoding="bytes")  # the batches were written by Python 2
        self.source = source
        self.allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> object:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise DatasetError(f"{self.source} references {module}.{name}, which a CIFAR-10 batch never "
                               "does: refusing to load it. The file is corrupt or was tampered with; "
                               "download the dataset again") from None


def load_cifar_batch(path: Path) -> tuple[Tensor, Tensor]:
    """(images uint8 [N, 3, 32, 32], labels int64 [N]) from one CIFAR-10 python batch file."""
    try:
        with path.open("rb") as f:
            batch = CifarUnpickler(f, source=str(path)).load()
    except FileNotFoundError:
        raise DatasetError(f"CIFAR-10 batch {path} is missing; pass --data-dir with the "
                           "cifar-10-batches-py folder (data_batch_1..5, test_batch)") from None
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, MemoryError) as e:
        raise DatasetError(f"cannot read CIFAR-10 batch {path}: {type(e).__name__}: {e}. "
                           "Download the dataset again") from None
    if not isinstance(batch, dict):
        raise DatasetError(f"{path} holds a {type(batch).__name__}, expected a dict; download the dataset again")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data, labels = batch.get("data"), batch.get("labels")
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        found = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{path}: 'data' is {found}, expected uint8 [N, 3072]; download the dataset again")
    if (not isinstance(labels, list) or len(labels) != len(data)
            or not all(isinstance(y, int) and 0 <= y < 10 for y in labels)):
        raise DatasetError(f"{path}: 'labels' is not a list of {len(data)} class indices in 0..9; "
                           "download the dataset again")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32)), torch.tensor(labels, dtype=torch.int64)


def load_cifar10(folder: Path) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """`folder` is ``cifar-10-batches-py`` or the folder that contains it."""
    if (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    if not folder.is_dir():
        raise DatasetError(f"CIFAR-10 folder {folder} does not exist; pass --data-dir with the "
                           "cifar-10-batches-py folder (data_batch_1..5, test_batch)")
    train = [load_cifar_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    test = load_cifar_batch(folder / "test_batch")
    return (torch.cat([x for x, _ in train]), torch.cat([y for _, y in train])), test


# --------------------------------------------------------------------------------------------
# Synthetic: Gaussian noise around one random template per class, so there is something to learn.

def make_synthetic(shape: tuple[int, int, int], num_classes: int, sizes: tuple[int, int], *, seed: int,
                   signal: float = 0.5) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Train and test (images float32 [n, *shape], labels [n]) sharing one template per class."""
    gen = torch.Generator().manual_seed(seed)
    templates = torch.randn((num_classes, *shape), generator=gen)
    splits = []
    for n in sizes:
        labels = torch.randint(num_classes, (n,), generator=gen)
        splits.append((signal * templates[labels] + torch.randn((n, *shape), generator=gen), labels))
    return splits[0], splits[1]


# --------------------------------------------------------------------------------------------

class ImageDataset(Dataset):
    """Images as stored, turned into model inputs per item: scale, pad or resize, normalise."""

    def __init__(self, images: Tensor, labels: Tensor, *, image_size: int, mean: Tensor, std: Tensor):
        self.images, self.labels = images, labels
        self.image_size, self.mean, self.std = image_size, mean.view(-1, 1, 1), std.view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x = to_float(self.images[index])
        return (fit(x, self.image_size) - self.mean) / self.std, self.labels[index]


def to_float(images: Tensor) -> Tensor:
    return images.float() / 255 if images.dtype == torch.uint8 else images.float()


def fit(x: Tensor, size: int) -> Tensor:
    """Image(s) [..., C, H, W] at size x size.

    Up to a quarter larger: zero-pad around the image, leaving its pixels untouched (28 -> 32 for
    a ViT's patches). Otherwise: bilinear resize (antialiased when shrinking).
    """
    h = x.shape[-1]
    if h == size:
        return x
    if h < size <= h * 5 // 4:
        before = (size - h) // 2
        return F.pad(x, (before, size - h - before, before, size - h - before))
    batch = x if x.dim() == 4 else x.unsqueeze(0)
    out = F.interpolate(batch, size=(size, size), mode="bilinear", align_corners=False, antialias=size < h)
    return out if x.dim() == 4 else out.squeeze(0)


def subset(images: Tensor, labels: Tensor, n: int | None, *, seed: int, split: str) -> tuple[Tensor, Tensor]:
    """`n` samples drawn without replacement, the same ones for the same seed; all when n is None."""
    if n is None:
        return images, labels
    if n > len(labels):
        raise ConfigError(f"--{split}-subset {n} exceeds the {len(labels)} {split} images; "
                          f"pass at most {len(labels)} (or 0 for all)")
    index = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:n]
    return images[index], labels[index]


def is_vit(model: str) -> bool:
    return any(tag in model.lower() for tag in ("vit", "deit"))


def default_image_size(model: str, native: int) -> int:
    """The dataset's own size, rounded up to a whole number of patches for ViTs."""
    return -(-native // PATCH_MULTIPLE) * PATCH_MULTIPLE if is_vit(model) else native


@dataclass(frozen=True)
class LoadedData:
    train: ImageDataset
    test: ImageDataset
    channels: int
    image_size: int
    num_classes: int


def load_data(dataset: DatasetName, *, model: str, data_dir: Path | None = None, seed: int = 0,
              train_subset: int | None = None, test_subset: int | None = None, image_size: int | None = None,
              normalize: bool = True, synthetic_shape: tuple[int, int, int] = (3, 32, 32),
              synthetic_classes: int = 10) -> LoadedData:
    """Train and test sets ready for `model` (which only decides the default image size).

    Subsets are drawn from the seed; synthetic data is generated at the subset sizes. With
    `normalize`, each channel is shifted and scaled by the training subset's mean and std.
    """
    dataset = DatasetName(dataset)
    if dataset is DatasetName.SYNTHETIC:
        num_classes, native = synthetic_classes, synthetic_shape[1]
        sizes = (train_subset or SYNTHETIC_SIZES[0], test_subset or SYNTHETIC_SIZES[1])
        train, test = make_synthetic(synthetic_shape, num_classes, sizes, seed=seed)
    else:
        num_classes, native = 10, NATIVE_SIZE[dataset]
        if dataset is DatasetName.FASHION_MNIST:
            full_train, full_test = load_fashion_mnist(data_dir or DEFAULT_FASHION_MNIST_DIR)
        elif data_dir is None:
            raise DatasetError("CIFAR-10 has no default location; pass --data-dir with the cifar-10-batches-py "
                               "folder (data_batch_1..5, test_batch)")
        else:
            full_train, full_test = load_cifar10(data_dir)
        train = subset(*full_train, train_subset, seed=seed, split="train")
        test = subset(*full_test, test_subset, seed=seed, split="test")
    size = image_size or default_image_size(model, native)
    channels = train[0].shape[1]
    if normalize:
        pixels = to_float(train[0]).transpose(0, 1).reshape(channels, -1)
        mean, std = pixels.mean(1), pixels.std(1).clamp_min(1e-6)
    else:
        mean, std = torch.zeros(channels), torch.ones(channels)
    return LoadedData(train=ImageDataset(*train, image_size=size, mean=mean, std=std),
                      test=ImageDataset(*test, image_size=size, mean=mean, std=std),
                      channels=channels, image_size=size, num_classes=num_classes)
