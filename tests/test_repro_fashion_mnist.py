"""Fashion-MNIST from IDX files: the reader and loader on small files written into tmp_path
(gzip and raw, every malformation the checks name), the stratified subset, and the real files
of the Debian package ``dataset-fashion-mnist`` when it is installed (skipped otherwise)."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest
import torch

from bgnorm.repro import data as D
from bgnorm.repro.data import (
    FASHION_MNIST_CLASSES,
    check_fashion_mnist,
    fashion_mnist_dataset,
    fashion_mnist_files,
    load_fashion_mnist,
    read_idx,
    stratified_subset,
)

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = {"train": ("train-images", "train-labels"), "test": ("t10k-images", "t10k-labels")}


def _images(n: int, offset: int = 0) -> np.ndarray:
    """``n`` distinct, asymmetric uint8 28x28 images (image ``k`` differs from every other)."""
    k, h, w = np.meshgrid(np.arange(offset, offset + n), np.arange(28), np.arange(28),
                          indexing="ij")
    return ((k * 37 + h * 7 + w * 3 + h * w) % 256).astype(np.uint8)


def _idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    magic = (0x0800 | array.ndim) if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write(path, payload: bytes, gz: bool) -> None:
    path.write_bytes(gzip.compress(payload) if gz else payload)


def _write_fashion(folder, n_train=30, n_test=20, gz=True, sep="-"):
    """The four standard files with ``n`` images each (labels ``k % 10``); returns the data."""
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    data = {}
    for split, n, offset in (("train", n_train, 0), ("test", n_test, 1000)):
        x, y = _images(n, offset), (np.arange(n) % 10).astype(np.uint8)
        images, labels = NAMES[split]
        _write(folder / f"{images}{sep}idx3-ubyte{suffix}", _idx_bytes(x), gz)
        _write(folder / f"{labels}{sep}idx1-ubyte{suffix}", _idx_bytes(y), gz)
        data[split] = x, y
    return data


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
def test_load_roundtrip(tmp_path, gz):
    data = _write_fashion(tmp_path, gz=gz)
    for split in ("train", "test"):
        x, y = load_fashion_mnist(tmp_path, train=split == "train")
        raw_x, raw_y = data[split]
        assert x.shape == (len(raw_x), 1, 28, 28) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and y.tolist() == raw_y.tolist()
        assert torch.equal((x[:, 0] * 255).round().to(torch.uint8), torch.from_numpy(raw_x))
    # Row-major pixels: byte 16 + 28 * row + col of the file is pixel (row, col) of image 0.
    x, _ = load_fashion_mnist(tmp_path)
    assert round(x[0, 0, 1, 2].item() * 255) == int(_images(1)[0, 1, 2])
    assert fashion_mnist_files(tmp_path)["test"][1].name == (
        "t10k-labels-idx1-ubyte" + (".gz" if gz else ""))


def test_other_layouts_and_fresh_tensors(tmp_path):
    # The dotted names of some mirrors, and torchvision's FashionMNIST/raw under the root.
    _write_fashion(tmp_path / "dots", gz=False, sep=".")
    assert load_fashion_mnist(tmp_path / "dots")[0].shape == (30, 1, 28, 28)
    _write_fashion(tmp_path / "tv" / "FashionMNIST" / "raw", n_train=10)
    assert check_fashion_mnist(tmp_path / "tv") == tmp_path / "tv" / "FashionMNIST" / "raw"
    x, y = load_fashion_mnist(tmp_path / "tv")
    assert len(y) == 10
    x.zero_()
    y.zero_()  # the cache hands out copies: a caller's in-place change cannot leak
    x2, y2 = load_fashion_mnist(tmp_path / "tv")
    assert x2.max() > 0 and y2.max() == 9


def test_gzip_detected_by_content_not_name(tmp_path):
    # A .gz file that was decompressed in place keeps its name: read it raw, and the reverse.
    _write_fashion(tmp_path, gz=False)
    (tmp_path / "train-images-idx3-ubyte").rename(tmp_path / "train-images-idx3-ubyte.gz")
    assert load_fashion_mnist(tmp_path)[0].shape == (30, 1, 28, 28)
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(gzip.compress(_idx_bytes(np.array([3, 1], np.uint8))))
    assert read_idx(path, D.IDX_LABELS_MAGIC).tolist() == [3, 1]


def test_cache_follows_the_files(tmp_path):
    _write_fashion(tmp_path, n_train=20)
    assert len(load_fashion_mnist(tmp_path)[1]) == 20
    _write_fashion(tmp_path, n_train=10)  # replaced in place (another download)
    assert len(load_fashion_mnist(tmp_path)[1]) == 10


_LABELS = np.arange(12, dtype=np.uint8) % 10


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
@pytest.mark.parametrize("payload, magic, message", [
    (_idx_bytes(_LABELS), 2051, r"magic number 2049 .*expected 2051 .*images and labels "
                                r"files are swapped"),
    (_idx_bytes(_images(2)), 2049, r"magic number 2051 .*expected 2049 .*swapped"),
    ((2049).to_bytes(4, "little") + (12).to_bytes(4, "big") + _LABELS.tobytes(), 2049,
     "byte-swapped: written little-endian"),
    (b"<html>404 Not Found</html>", 2049, "not an IDX file"),
    (_idx_bytes(_LABELS)[:-3], 2049, r"truncated: 9 data bytes where its header \(shape "
                                     r"\(12,\)\) announces 12"),
    (_idx_bytes(_images(3))[:-100], 2051, "truncated: 2252 data bytes"),
    (_idx_bytes(_LABELS) + b"\0", 2049, "longer than its header says"),
    (_idx_bytes(_images(2))[:10], 2051, r"truncated inside its header \(10 of 16 bytes\)"),
    (b"\0\0", 2049, "2 bytes, too short for an IDX header"),
    (_idx_bytes(np.zeros((0,), np.uint8)), 2049, r"empty IDX file of shape \(0,\)"),
], ids=["labels-as-images", "images-as-labels", "little-endian", "html", "truncated-labels",
        "truncated-images", "overlong", "truncated-header", "two-bytes", "empty"])
def test_read_idx_errors_name_file_and_problem(tmp_path, gz, payload, magic, message):
    path = tmp_path / "file-idx-ubyte"
    _write(path, payload, gz)
    with pytest.raises(ValueError, match=message) as err:
        read_idx(path, magic)
    assert str(path) in str(err.value)


def test_truncated_gzip_is_named(tmp_path):
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(_idx_bytes(_LABELS))[:-12])
    with pytest.raises(ValueError, match="damaged or truncated gzip file"):
        read_idx(path, 2049)


def test_split_checks(tmp_path):
    _write_fashion(tmp_path)
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    bad = (np.arange(30) % 10).astype(np.uint8)
    bad[17] = 10
    _write(labels, _idx_bytes(bad), gz=True)
    with pytest.raises(ValueError, match=r"label 10 at index 17; Fashion-MNIST labels are 0 to "
                                         r"9") as err:
        check_fashion_mnist(tmp_path)
    assert str(labels) in str(err.value)
    _write(labels, _idx_bytes(bad[:29] % 10), gz=True)
    with pytest.raises(ValueError, match=r"holds 30 images but .* holds 29 labels"):
        load_fashion_mnist(tmp_path)
    _write_fashion(tmp_path)
    _write(tmp_path / "t10k-images-idx3-ubyte.gz", _idx_bytes(np.zeros((20, 32, 32), np.uint8)),
           gz=True)
    with pytest.raises(ValueError, match="images of 32x32 pixels; Fashion-MNIST images are "
                                         "28x28"):
        check_fashion_mnist(tmp_path)  # the test split is checked too
    assert load_fashion_mnist(tmp_path)[0].shape == (30, 1, 28, 28)


def test_missing_files_say_how_to_get_them(tmp_path, monkeypatch):
    _write_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing in .*: t10k-labels-idx1-ubyte\(\.gz\)"
                       ) as err:
        load_fashion_mnist(tmp_path, train=True)  # both splits must be there
    for fix in ("apt-get install dataset-fashion-mnist", "--data-root FOLDER",
                "nothing is downloaded"):
        assert fix in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"data root .*nope does not exist: install it"):
        check_fashion_mnist(tmp_path / "nope")
    monkeypatch.setattr(D, "FASHION_MNIST_DIR", tmp_path / "not-installed")
    with pytest.raises(FileNotFoundError, match=r"Fashion-MNIST is not installed \(no folder "
                                                r".*not-installed\): install it with `apt-get "
                                                r"install dataset-fashion-mnist`"):
        load_fashion_mnist()
    monkeypatch.setattr(D, "FASHION_MNIST_DIR", tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(
        _idx_bytes((np.arange(20) % 10).astype(np.uint8)))
    assert check_fashion_mnist() == tmp_path  # the default folder when no root is given


def test_stratified_subset():
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    idx = stratified_subset(y, 10, seed=3)
    assert idx.dtype == torch.int64 and idx.tolist() == sorted(set(idx.tolist()))
    assert torch.bincount(y[idx]).tolist() == [5, 3, 2]
    # Largest remainders: 7 of (50, 30, 20) -> quotas 3.5, 2.1, 1.4 -> 3 + 1, 2, 1; of
    # (20, 30, 50) -> 1.4, 2.1, 3.5 -> 1, 2, 3 + 1.
    assert torch.bincount(y[stratified_subset(y, 7)]).tolist() == [4, 2, 1]
    flipped = 2 - y
    assert torch.bincount(flipped[stratified_subset(flipped, 7)]).tolist() == [1, 2, 4]
    assert torch.equal(stratified_subset(y, 10, seed=3), idx)
    assert not torch.equal(stratified_subset(y, 10, seed=4), idx)
    assert stratified_subset(y, 100).tolist() == list(range(100))
    for n in (0, 101):
        with pytest.raises(ValueError, match=f"a subset of {n} examples out of 100: use 1 to "
                                             "100"):
            stratified_subset(y, n)


def test_fashion_mnist_dataset(tmp_path):
    data = _write_fashion(tmp_path, n_train=40, n_test=20)
    full = fashion_mnist_dataset(tmp_path)
    assert (full.name, full.num_classes, full.in_channels) == ("fashion-mnist", 10, 1)
    assert full.x_train.shape == (40, 1, 28, 28) and full.x_test.shape == (20, 1, 28, 28)
    # Its own test set, whole and in file order; standardized with the training images' stats.
    assert full.y_test.tolist() == data["test"][1].tolist()
    x64 = torch.from_numpy(data["train"][0]).double().div(255)
    mean, std = x64.mean().item(), x64.std().item()
    assert full.mean == pytest.approx((mean,), rel=1e-5)
    assert full.std == pytest.approx((std,), rel=1e-5)
    expect = (torch.from_numpy(data["test"][0]).double().div(255) - mean) / std
    torch.testing.assert_close(full.x_test[:, 0].double(), expect, atol=1e-5, rtol=0)

    sub = fashion_mnist_dataset(tmp_path, size=16, train_subset=20, seed=1)
    assert sub.x_train.shape == (20, 1, 16, 16) and sub.x_test.shape == (20, 1, 16, 16)
    assert torch.bincount(sub.y_train).tolist() == [2] * 10
    assert abs(sub.x_train.mean().item()) < 1e-5 and sub.x_train.std().item() == pytest.approx(1)
    again = fashion_mnist_dataset(tmp_path, size=16, train_subset=20, seed=1)
    assert torch.equal(again.x_train, sub.x_train)
    other = fashion_mnist_dataset(tmp_path, size=16, train_subset=20, seed=2)
    assert not torch.equal(other.x_train, sub.x_train)
    with pytest.raises(ValueError, match="train_subset=41: .* has 40 images; use 1 to 40"):
        fashion_mnist_dataset(tmp_path, train_subset=41)
    with pytest.raises(ValueError, match="train_subset=41: the training set at .* has 40 "
                                         "images"):
        check_fashion_mnist(tmp_path, train_subset=41)
    assert check_fashion_mnist(tmp_path, train_subset=40) == tmp_path


# --------------------------------------------------------------------------------------------
# The real files (apt-get install dataset-fashion-mnist)
# --------------------------------------------------------------------------------------------

#: The first labels of each split as published (the Debian package recompresses the files, so
#: the authors' MD5 sums of the .gz files do not apply; the decoded contents are the same).
_FIRST_LABELS = {"train": [9, 0, 0, 3, 0, 2, 7, 2, 5, 5], "t10k": [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]}


@pytest.mark.skipif(not (D.FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
                    reason="dataset-fashion-mnist is not installed")
def test_real_files_of_the_debian_package():
    assert check_fashion_mnist() == D.FASHION_MNIST_DIR
    for split, n in (("train", 60000), ("t10k", 10000)):
        x, y = load_fashion_mnist(train=split == "train")
        assert x.shape == (n, 1, 28, 28) and torch.bincount(y).tolist() == [n // 10] * 10
        assert y[:10].tolist() == _FIRST_LABELS[split]
        # Against a plain decode of the published layout (16- and 8-byte headers).
        raw = gzip.decompress((D.FASHION_MNIST_DIR / f"{split}-images-idx3-ubyte.gz")
                              .read_bytes())
        pixels = np.frombuffer(raw, np.uint8, offset=16).reshape(n, 28, 28)
        assert torch.equal((x[:, 0] * 255).round().to(torch.uint8), torch.from_numpy(pixels.copy()))
        raw = gzip.decompress((D.FASHION_MNIST_DIR / f"{split}-labels-idx1-ubyte.gz")
                              .read_bytes())
        assert y.tolist() == np.frombuffer(raw, np.uint8, offset=8).tolist()
    split = fashion_mnist_dataset(size=16, train_subset=2000)
    assert split.x_train.shape == (2000, 1, 16, 16) and len(split.y_test) == 10000
    assert torch.bincount(split.y_train).tolist() == [200] * 10
    assert len(FASHION_MNIST_CLASSES) == 10 and os.path.isdir(D.FASHION_MNIST_DIR)
