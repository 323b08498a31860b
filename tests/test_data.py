"""Datasets: the IDX reader and the CIFAR unpickler treat files as hostile; synthetic data is seeded."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from tempo.errors import ConfigError, DatasetError
from tempo.training.config import DatasetName, parse_shape
from tempo.training.data import (
    CifarUnpickler,
    default_image_size,
    fit,
    load_cifar_batch,
    load_data,
    load_fashion_mnist,
    make_synthetic,
    parse_idx,
    read_idx,
    subset,
)

REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def idx_bytes(array: np.ndarray) -> bytes:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}
    header = struct.pack(">HBB", 0, codes[array.dtype], array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_fashion_mnist(folder: Path, n_train: int = 12, n_test: int = 6) -> dict[str, np.ndarray]:
    """A tiny Fashion-MNIST folder in the real layout (gzip-compressed IDX files)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        arrays[f"{split}-images-idx3-ubyte"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}-labels-idx1-ubyte"] = rng.integers(0, 10, n, dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        (folder / f"{stem}.gz").write_bytes(gzip.compress(idx_bytes(array)))
    return arrays


# -- IDX ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("array", [np.arange(24, dtype=np.uint8).reshape(2, 3, 4), np.arange(5, dtype=np.int32),
                                   np.linspace(0, 1, 6, dtype=np.float32).reshape(3, 2)])
def test_idx_round_trip(array: np.ndarray) -> None:
    parsed = parse_idx(idx_bytes(array), name="x")
    assert parsed.dtype == array.dtype and parsed.shape == array.shape
    np.testing.assert_array_equal(parsed, array)


@pytest.mark.parametrize(("mutate", "words"), [
    (lambda b: b"\x01\x02" + b[2:], "bad magic"),
    (lambda b: b[:2] + b"\x07" + b[3:], "bad magic"),
    (lambda b: b[:-1], "truncated"),
    (lambda b: b[:6], "header truncated"),
    (lambda b: b + b"\0", "trailing bytes"),
    (lambda b: b"", "only 0 bytes"),
])
def test_idx_rejects_corrupt_headers(mutate, words: str) -> None:
    raw = idx_bytes(np.zeros((3, 28, 28), dtype=np.uint8))
    with pytest.raises(DatasetError, match=words) as info:
        parse_idx(mutate(raw), name="some/file")
    assert "some/file" in str(info.value)


def test_idx_rejects_truncated_gzip(tmp_path: Path) -> None:
    path = tmp_path / "images.gz"
    images = np.random.default_rng(0).integers(0, 256, (50, 28, 28), dtype=np.uint8)
    path.write_bytes(gzip.compress(idx_bytes(images))[:-100])
    with pytest.raises(DatasetError, match="corrupt or truncated") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_fashion_mnist_from_a_folder(tmp_path: Path) -> None:
    arrays = write_fashion_mnist(tmp_path)
    (train_x, train_y), (test_x, _) = load_fashion_mnist(tmp_path)
    assert train_x.shape == (12, 1, 28, 28) and train_x.dtype == torch.uint8 and test_x.shape == (6, 1, 28, 28)
    np.testing.assert_array_equal(train_y.numpy(), arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(test_x[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])


def test_fashion_mnist_missing_folder_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist") as info:
        load_fashion_mnist(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value) and "--data-dir" in str(info.value)


def test_fashion_mnist_missing_file_is_named(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte\.gz is missing"):
        load_fashion_mnist(tmp_path)


def test_fashion_mnist_labels_must_match_images(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(5, dtype=np.uint8))))
    with pytest.raises(DatasetError, match="expected 12 uint8 labels"):
        load_fashion_mnist(tmp_path)


@pytest.mark.skipif(not REAL_FASHION_MNIST.is_dir(), reason="Fashion-MNIST is not installed")
def test_real_fashion_mnist_labels() -> None:
    labels = read_idx(REAL_FASHION_MNIST / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10_000,) and np.bincount(labels).tolist() == [1000] * 10


# -- CIFAR-10 ----------------------------------------------------------------------------------

def cifar_batch_bytes(n: int, seed: int) -> bytes:
    """A batch as CIFAR-10 ships it: a protocol-2-era pickle with bytes keys, made by numpy.core."""
    rng = np.random.default_rng(seed)
    batch = {b"batch_label": b"training batch", b"labels": rng.integers(0, 10, n).tolist(),
             b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
    raw = pickle.dumps(batch, protocol=3)  # text GLOBAL opcodes: safe to rename the module
    return raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def write_cifar(folder: Path, n: int = 4) -> Path:
    batches = folder / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    for i, name in enumerate([*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]):
        (batches / name).write_bytes(cifar_batch_bytes(n, seed=i))
    return batches


def test_cifar_batch_in_the_real_format(tmp_path: Path) -> None:
    path = write_cifar(tmp_path) / "data_batch_2"
    assert b"cnumpy.core.multiarray\n_reconstruct" in path.read_bytes()
    images, labels = load_cifar_batch(path)
    batch = pickle.loads(path.read_bytes(), encoding="bytes")
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.uint8
    np.testing.assert_array_equal(images.reshape(4, -1).numpy(), batch[b"data"])
    assert labels.tolist() == batch[b"labels"]


def test_cifar10_dataset(tmp_path: Path) -> None:
    write_cifar(tmp_path, n=4)
    data = load_data(DatasetName.CIFAR10, model="resnet18", data_dir=tmp_path)
    assert (len(data.train), len(data.test), data.channels, data.image_size, data.num_classes) == (20, 4, 3, 32, 10)
    x, y = data.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= int(y) < 10


class Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cifar_unpickler_refuses_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": Exploit(marker), b"labels": []}, protocol=3))
    with pytest.raises(DatasetError, match=r"references posix\.system.*refusing") as info:
        load_cifar_batch(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("name", [("builtins", "eval"), ("numpy", "load"), ("subprocess", "Popen")])
def test_cifar_unpickler_allows_only_array_reconstruction(name: tuple[str, str]) -> None:
    with pytest.raises(DatasetError, match="refusing"):
        CifarUnpickler(io.BytesIO(), source="x").find_class(*name)


def test_cifar_batch_with_wrong_contents(tmp_path: Path) -> None:
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 10), dtype=np.uint8), b"labels": [0, 1]}, protocol=3))
    with pytest.raises(DatasetError, match=r"expected uint8 \[N, 3072\]"):
        load_cifar_batch(path)
    path.write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="cannot read CIFAR-10 batch"):
        load_cifar_batch(path)


def test_cifar_needs_a_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="--data-dir"):
        load_data(DatasetName.CIFAR10, model="resnet18")
    with pytest.raises(DatasetError, match="data_batch_1 is missing"):
        load_data(DatasetName.CIFAR10, model="resnet18", data_dir=tmp_path)


# -- synthetic, subsets, sizes -------------------------------------------------------------------

def test_synthetic_is_seeded() -> None:
    (a_x, a_y), (t_x, _) = make_synthetic((3, 8, 8), 4, (32, 16), seed=1)
    (b_x, b_y), _ = make_synthetic((3, 8, 8), 4, (32, 16), seed=1)
    (c_x, _), _ = make_synthetic((3, 8, 8), 4, (32, 16), seed=2)
    assert a_x.shape == (32, 3, 8, 8) and t_x.shape == (16, 3, 8, 8) and a_y.max() < 4
    assert torch.equal(a_x, b_x) and torch.equal(a_y, b_y) and not torch.equal(a_x, c_x)


def test_synthetic_classes_are_separable() -> None:
    """Nearest class mean, estimated on train, classifies test far above chance: there is a signal."""
    (x, y), (tx, ty) = make_synthetic((1, 8, 8), 5, (500, 200), seed=0)
    means = torch.stack([x[y == c].mean(0) for c in range(5)]).flatten(1)
    predicted = torch.cdist(tx.flatten(1), means).argmin(1)
    assert (predicted == ty).float().mean() > 0.6


def test_subset_is_seeded_and_bounded() -> None:
    images, labels = torch.arange(100).view(100, 1), torch.arange(100)
    a, b = subset(images, labels, 10, seed=3, split="train"), subset(images, labels, 10, seed=3, split="train")
    assert torch.equal(a[1], b[1]) and len(a[1]) == 10 and len(set(a[1].tolist())) == 10
    assert not torch.equal(a[1], subset(images, labels, 10, seed=4, split="train")[1])
    assert subset(images, labels, None, seed=3, split="train")[1] is labels
    with pytest.raises(ConfigError, match="--test-subset 101 exceeds the 100 test images"):
        subset(images, labels, 101, seed=0, split="test")


def test_fit_pads_small_steps_and_resizes_large_ones() -> None:
    x = torch.rand(1, 28, 28)
    padded = fit(x, 32)
    assert padded.shape == (1, 32, 32) and torch.equal(padded[:, 2:30, 2:30], x) and padded[:, :2].abs().sum() == 0
    assert fit(x, 64).shape == (1, 64, 64) and fit(x, 16).shape == (1, 16, 16) and fit(x, 28) is x


def test_default_image_size_fits_vit_patches() -> None:
    assert default_image_size("resnet18", 28) == 28
    assert default_image_size("vit_b_16", 28) == 32 and default_image_size("timm:vit_tiny_patch16_224", 32) == 32


def test_load_data_normalises_and_resizes(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path, n_train=40, n_test=10)
    data = load_data(DatasetName.FASHION_MNIST, model="vit_b_16", data_dir=tmp_path, train_subset=30, test_subset=5)
    assert (len(data.train), len(data.test), data.channels, data.image_size) == (30, 5, 1, 32)
    train = torch.stack([data.train[i][0][:, 2:30, 2:30] for i in range(30)])
    assert abs(float(train.mean())) < 1e-4 and abs(float(train.std()) - 1) < 1e-2
    raw = load_data(DatasetName.FASHION_MNIST, model="resnet18", data_dir=tmp_path, normalize=False, image_size=56)
    x, _ = raw.train[0]
    assert x.shape == (1, 56, 56) and 0 <= float(x.min()) and float(x.max()) <= 1


def test_parse_shape() -> None:
    assert parse_shape("3,32,32") == (3, 32, 32)
    for bad in ("3,32", "a,b,c", "3,32,16", "0,8,8"):
        with pytest.raises(ConfigError, match="--synthetic-shape"):
            parse_shape(bad)
