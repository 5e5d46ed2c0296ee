"""The classification tasks on users' data in the real file formats, through the runner."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from bgnorm.repro.runner import RunOptions, render_report, run_sweep
from bgnorm.repro.store import read_records
from bgnorm.repro.tasks.classify import cells_batch_size, cells_groups

TINY = {"model": "small_resnet", "batch_sizes": [4], "norms": ["bn", "bgn", "gn"],
        "loader_workers": 0,
        "set": {"epochs": 1, "median_of": 1, "workers": 2, "eval_batch_size": 16,
                "model_kwargs": {"width": 4, "blocks_per_stage": [1, 1]}}}


@pytest.fixture(autouse=True)
def _threads():
    prev = torch.get_num_threads()
    yield
    torch.set_num_threads(prev)


def _write_cifar(root, n=16):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, n)]}
        with open(folder / name, "wb") as fh:
            pickle.dump(entry, fh, protocol=2)


def _write_image_folder(root, n=12):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog", "eel"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n if split == "train" else 4):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
                    d / f"{i}.png")


def _sweep(out, overrides):
    return run_sweep(RunOptions(tasks=["batch-size"], preset="paper", out_dir=out,
                                overrides=overrides, jobs=1, threads=1, progress=False))


def test_paper_preset_on_cifar10_files(tmp_path):
    _write_cifar(tmp_path / "data")
    s = _sweep(tmp_path / "run", {**TINY, "dataset": "cifar10",
                                  "data_root": str(tmp_path / "data")})
    assert (s.finished, s.failed) == (3, [])
    recs = read_records(tmp_path / "run")
    bn = next(r for r in recs if r.config["norm"] == "bn")
    # 8 virtual workers in the paper preset, here set to 2: 2 x 4 examples per step,
    # lr 0.1 per 32 examples per worker.
    assert bn.config["workers"] == 2 and bn.config["lr"] == pytest.approx(0.1 * 4 / 32 * 2 / 8)
    assert bn.config["runtime"] == {"data_root": str(tmp_path / "data"), "loader_workers": 0}
    assert bn.result["n_test"] == 16 and bn.result["steps_per_epoch"] == 10
    assert "| BN " in render_report(tmp_path / "run")


def test_paper_preset_on_an_image_folder(tmp_path):
    _write_image_folder(tmp_path / "data")
    over = {**TINY, "dataset": "imagefolder", "data_root": str(tmp_path / "data"),
            "image_size": 16}
    s = _sweep(tmp_path / "run", over)
    assert (s.finished, s.failed) == (3, [])
    rec = read_records(tmp_path / "run")[0]
    assert rec.result["n_test"] == 12 and rec.result["steps_per_epoch"] == 4


def test_paper_preset_defaults():
    cells = cells_batch_size("paper", {"data_root": "/data/imagenet", "device": "cuda"})
    # 7 norms x 7 sizes: with 8 workers every column has its own examples per step (8b), so
    # the per-example norms share no run across columns.
    assert len(cells) == 49
    bgn = {c["batch_size"]: c for c in cells if c["norm"] == "bgn"}
    assert {b: c["num_groups"] for b, c in bgn.items()} == {
        128: 512, 64: 256, 32: 128, 16: 64, 8: 16, 4: 2, 2: 1}
    assert {b: c["lr"] for b, c in bgn.items()} == pytest.approx(
        {b: 0.1 * b / 32 for b in bgn})
    c = bgn[32]
    assert (c["model"], c["epochs"], c["median_of"], c["workers"], c["amp"]) == (
        "resnet50", 100, 5, 8, "bf16")
    assert c["zero_init_residual"] is True
    gn = next(c for c in cells if c["norm"] == "gn" and c["covers_batch_sizes"] == [32])
    assert (gn["batch_size"], gn["workers"], gn["gn_groups"]) == (256, 1, 32)
    groups = cells_groups("paper", {"data_root": "/x"})
    assert len(groups) == 7 + 7 + 2


# --------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX files written here; the real ones in test_repro_fashion_mnist.py)
# --------------------------------------------------------------------------------------------


def _write_fashion(root, n_train=40, n_test=24):
    import gzip

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        for kind, arr, magic in (("images-idx3", x, 2051), ("labels-idx1", y, 2049)):
            head = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
            (root / f"{stem}-{kind}-ubyte.gz").write_bytes(gzip.compress(head + arr.tobytes()))


def test_fashion_mnist_cells_through_the_runner(tmp_path):
    _write_fashion(tmp_path / "data")
    over = {**TINY, "dataset": "fashion-mnist", "data_root": str(tmp_path / "data"), "seeds": [0],
            "set": {**TINY["set"], "train_subset": 20, "epochs": 2}}
    s = run_sweep(RunOptions(tasks=["batch-size"], preset="quick", out_dir=tmp_path / "run",
                             overrides=over, jobs=1, threads=1, progress=False))
    assert (s.finished, s.failed) == (3, [])
    recs = read_records(tmp_path / "run")
    bn = next(r for r in recs if r.config["norm"] == "bn")
    # The dataset's defaults (16 px), the subset of 20 training images (2 workers x 4 per
    # step: 2 steps per epoch; cosine after a warm-up epoch), and its own test set, whole.
    assert (bn.config["dataset"], bn.config["image_size"], bn.config["train_subset"]) == (
        "fashion-mnist", 16, 20)
    assert bn.result["n_test"] == 24 and bn.result["steps_per_epoch"] == 2
    assert bn.config["runtime"] == {"data_root": str(tmp_path / "data"), "loader_workers": 0}
    assert "fashion-mnist (16 px, 20 training images)" in render_report(tmp_path / "run")


def test_fashion_mnist_defaults_and_subset_checks(tmp_path, monkeypatch):
    from bgnorm.repro import data as D
    from bgnorm.repro.runner import check_environment

    # Without a data root the Debian package's folder is read; absent, one message says how
    # to get the data.
    monkeypatch.setattr(D, "FASHION_MNIST_DIR", tmp_path / "absent")
    cells = cells_batch_size("full", {"dataset": "fashion-mnist"})
    assert all(c["train_subset"] == 20000 and "runtime" not in c for c in cells)
    with pytest.raises(ValueError, match=r"the batch-size cells cannot read their data: "
                                         r"Fashion-MNIST is not installed .*apt-get install "
                                         r"dataset-fashion-mnist.*--data-root"):
        check_environment([("batch-size", c) for c in cells])
    _write_fashion(tmp_path / "absent")
    with pytest.raises(ValueError, match="train_subset=20000: the training set at .* has 40"):
        check_environment([("batch-size", c) for c in cells])
    small = cells_batch_size("full", {"dataset": "fashion-mnist", "set": {"train_subset": 40}})
    assert check_environment([("batch-size", c) for c in small]) == [str(tmp_path / "absent")]
    # Bundled digits take a subset too, checked against their training split.
    digits = cells_batch_size("smoke", {"set": {"train_subset": 1439}})
    with pytest.raises(ValueError, match="train_subset=1439: the digits training split has "
                                         "1438 images"):
        check_environment([("batch-size", c) for c in digits])
    # Configs without a subset keep their cells (and so their ids) as before.
    assert not any("train_subset" in c for c in cells_batch_size("quick", {}))
    with pytest.raises(ValueError, match="train_subset applies to the datasets held in memory"):
        cells_batch_size("paper", {"dataset": "cifar10", "data_root": "/x",
                                   "set": {"train_subset": 100}})
