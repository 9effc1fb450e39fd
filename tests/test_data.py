"""Datasets, archives, prepared arrays, the search split, augmentation and loaders (nascore.data).

Every on-disk format is exercised with small files written here in the real layout: CIFAR python
pickles, SVHN .mat files, ImageFolder trees and archives of them. The real CIFAR-10 JPEG copy in
../shared/data is loaded when present.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.datasets
from PIL import Image

from nascore import augment as aug
from nascore import data as D
from nascore.registry import UnknownNameError
from tests._tiny import CountOps

REAL_CIFAR10 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")


def _images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """n random uint8 images (N, H, W, 3), smooth enough that JPEG keeps them close."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    return coarse.repeat(size // 4, axis=1).repeat(size // 4, axis=2)


# ------------------------------------------------------------------------------------------------
# Files in the real formats

def _write_cifar(root: Path, hundred: bool = False, per_batch: int = 4, n_test: int = 10) -> dict:
    """CIFAR python batches as torchvision downloads them: dicts with uint8 data (N, 3072)."""
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    num_classes = 100 if hundred else 10
    label_key = "fine_labels" if hundred else "labels"
    names = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    n_per = per_batch * (5 if hundred else 1)
    written: dict = {"train_images": [], "train_labels": []}
    for i, name in enumerate([*names, "test" if hundred else "test_batch"]):
        test = i == len(names)
        n = n_test if test else n_per
        hwc = _images(n, seed=i)
        labels = [(i * 7 + k) % num_classes for k in range(n)]
        batch = {"batch_label": name, label_key: labels, "filenames": [f"{k}.png" for k in range(n)],
                 "data": hwc.transpose(0, 3, 1, 2).reshape(n, -1)}
        if hundred:
            batch["coarse_labels"] = [lab // 5 for lab in labels]
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        key = "test" if test else "train"
        written.setdefault(f"{key}_images", []).append(hwc)
        written.setdefault(f"{key}_labels", []).extend(labels)
    classes = [f"c{k:03d}" for k in range(num_classes)]
    meta = {"fine_label_names": classes, "coarse_label_names": []} if hundred else \
        {"label_names": list(CIFAR10_CLASSES), "num_cases_per_batch": per_batch}
    (folder / ("meta" if hundred else "batches.meta")).write_bytes(pickle.dumps(meta, protocol=2))
    return {k: np.concatenate(v) if k.endswith("images") else v for k, v in written.items()}


def _write_svhn(root: Path, n: int = 12) -> tuple[np.ndarray, np.ndarray]:
    import scipy.io

    root.mkdir(parents=True, exist_ok=True)
    hwc = _images(n, seed=3)
    digits = np.arange(n) % 10
    y = np.where(digits == 0, 10, digits).reshape(n, 1).astype(np.uint8)   # SVHN: digit 0 is 10
    scipy.io.savemat(root / "train_32x32.mat", {"X": hwc.transpose(1, 2, 3, 0), "y": y})
    return hwc, digits


def _write_imagenet16(root: Path, per_batch: int = 6, n_val: int = 8, layout: str = "zips") -> dict:
    """Downsampled ImageNet 16×16 batches as image-net.org ships them: pickled dicts with uint8 data
    (N, 768) channel-planar, 1-based ImageNet labels over all 1000 classes, a per-pixel mean in the
    training batches. layout "zips": unpacked into Imagenet16_train/ and Imagenet16_val/ as the
    two zips do; "flat": every file in root."""
    written: dict = {}
    for train, names in D.DOWNSAMPLED_FILES.items():
        folder = root if layout == "flat" else root / ("Imagenet16_train" if train else "Imagenet16_val")
        folder.mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(names):
            n = per_batch if train else n_val
            hwc = _images(n, size=16, seed=50 + i + 20 * train)
            # every other image is from a class past 120, which ImageNet16-120 drops
            labels = [1 + (7 * i + k) % 120 if k % 2 == 0 else 121 + (k * 37 + i) % 880 for k in range(n)]
            batch = {"data": hwc.transpose(0, 3, 1, 2).reshape(n, -1), "labels": labels}
            if train:
                batch["mean"] = np.zeros(768, dtype=np.float64)
            (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
            key = "train" if train else "test"
            kept = [k for k, lab in enumerate(labels) if lab <= 120]
            written.setdefault(f"{key}_images", []).append(hwc[kept])
            written.setdefault(f"{key}_labels", []).extend(labels[k] - 1 for k in kept)
    return {k: np.concatenate(v) if k.endswith("images") else v for k, v in written.items()}


def _write_tree(root: Path, classes=CIFAR10_CLASSES, per_class: int = 2, size: int = 32,
                splits=("train", "test")) -> dict:
    """An ImageFolder tree; the first image of each class is PNG (lossless), the rest JPEG."""
    written = {}
    for split in splits:
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for k, img in enumerate(_images(per_class, size, seed=100 * c + len(split))):
                path = folder / (f"{k:04d}.png" if k == 0 else f"{k:04d}.jpg")
                Image.fromarray(img).save(path, quality=95)
                written[path] = img
    return written


def _tar(tree: Path, out: Path, top: str | None = "cifar10") -> Path:
    with tarfile.open(out, "w:gz") as tar:
        for split in sorted(tree.iterdir()):
            tar.add(split, arcname=f"{top}/{split.name}" if top else split.name)
    return out


@pytest.fixture
def data_tree(tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "tree"
    return root, _write_tree(root)


# ------------------------------------------------------------------------------------------------
# Registry

def test_registry_has_the_datasets_with_their_statistics() -> None:
    assert D.DATASETS.names() == ["cifar10", "cifar100", "imagenet", "imagenet16_120", "svhn", "synthetic"]
    c10 = D.dataset_info("cifar10")
    assert (c10.num_classes, c10.image_size, c10.mean, c10.std) == (
        10, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    assert D.dataset_info("cifar100").std == (0.2673, 0.2564, 0.2762)
    assert D.dataset_info("svhn").mean == (0.4377, 0.4438, 0.4728)
    assert D.dataset_info("svhn").train_size == 73_257                    # `train` only, no `extra`
    assert D.dataset_info("imagenet").num_classes == 1000
    # NB201's ImageNet16-120: its code's statistics (x/255), 16 px, crop padding 2 (methods.md §1.3)
    in16 = D.dataset_info("imagenet16_120")
    assert (in16.num_classes, in16.image_size, in16.crop_padding, in16.train_size, in16.test_size) == (
        120, 16, 2, 151_700, 6_000)
    assert np.allclose(np.array(in16.mean) * 255, (122.68, 116.66, 104.01))
    assert np.allclose(np.array(in16.std) * 255, (63.22, 61.26, 65.09))
    assert c10.crop_padding == 4
    with pytest.raises(UnknownNameError, match="allowed: cifar10, cifar100, imagenet, imagenet16_120, svhn"):
        D.dataset_info("cifar")


# ------------------------------------------------------------------------------------------------
# torchvision formats

@pytest.mark.parametrize("hundred", [False, True], ids=["cifar10", "cifar100"])
def test_cifar_pickles_load_like_torchvision(tmp_path: Path, hundred: bool) -> None:
    written = _write_cifar(tmp_path, hundred)
    name = "cifar100" if hundred else "cifar10"
    train = D.load_image_dataset(name, tmp_path, train=True)
    test = D.load_image_dataset(name, tmp_path, train=False)
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (10, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert np.array_equal(train.images.permute(0, 2, 3, 1).numpy(), written["train_images"])
    assert train.labels.tolist() == written["train_labels"]
    assert test.labels.tolist() == written["test_labels"]
    assert len(train.classes) == (100 if hundred else 10)
    assert train.mean == D.dataset_info(name).mean
    # the same root given as torchvision's folder itself
    folder = next(tmp_path.iterdir())
    assert torch.equal(D.load_image_dataset(name, folder, train=False).images, test.images)


def test_cifar_incomplete_or_tampered_files_are_refused(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    evil = pickle.dumps({"data": os.getcwd}, protocol=2)     # a global that is not an array
    (folder / "data_batch_2").write_bytes(evil)
    with pytest.raises(D.DatasetError, match=r"data_batch_2.*refusing to load posix.getcwd"):
        D.load_image_dataset("cifar10", tmp_path, train=True)
    (folder / "data_batch_2").unlink()
    with pytest.raises(D.DatasetError,
                       match=r"incomplete CIFAR-10.*missing data_batch_2.*data.download: true"):
        D.load_image_dataset("cifar10", tmp_path, train=True)


def test_svhn_mat_maps_label_10_to_digit_0(tmp_path: Path) -> None:
    hwc, digits = _write_svhn(tmp_path)
    svhn = D.load_image_dataset("svhn", tmp_path, train=True)
    assert np.array_equal(svhn.images.permute(0, 2, 3, 1).numpy(), hwc)
    assert svhn.labels.tolist() == digits.tolist()
    assert svhn.classes == tuple("0123456789")
    with pytest.raises(D.DatasetError, match="test_32x32.mat.*data.download: true"):
        D.load_image_dataset("svhn", tmp_path, train=False)


@pytest.mark.parametrize("layout", ["zips", "flat"])
def test_imagenet16_keeps_the_first_120_classes_of_the_downsampled_batches(tmp_path: Path, layout: str) -> None:
    written = _write_imagenet16(tmp_path / "in16", layout=layout)
    train = D.load_image_dataset("imagenet16_120", tmp_path / "in16", train=True, download=True)
    test = D.load_image_dataset("imagenet16_120", tmp_path / "in16", train=False)
    assert train.images.shape == (30, 3, 16, 16) and test.images.shape == (4, 3, 16, 16)   # 10 × 3, 1 × 4
    assert np.array_equal(train.images.permute(0, 2, 3, 1).numpy(), written["train_images"])
    assert np.array_equal(test.images.permute(0, 2, 3, 1).numpy(), written["test_images"])
    assert train.labels.tolist() == written["train_labels"] and test.labels.tolist() == written["test_labels"]
    assert int(train.labels.min()) >= 0 and int(train.labels.max()) < 120
    assert train.classes == tuple(str(k) for k in range(1, 121)) and train.mean == D.dataset_info("imagenet16_120").mean
    assert D.dataset_crop_padding(train) == 2


def test_imagenet16_from_an_archive_with_a_top_level_folder(tmp_path: Path) -> None:
    written = _write_imagenet16(tmp_path / "ImageNet16")
    archive = tmp_path / "in16.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "ImageNet16", arcname="ImageNet16")
    test = D.load_image_dataset("imagenet16_120", archive, train=False, cache_dir=tmp_path / "cache")
    assert test.labels.tolist() == written["test_labels"]


def test_imagenet16_missing_duplicated_or_foreign_files_are_named(tmp_path: Path) -> None:
    root = tmp_path / "in16"
    _write_imagenet16(root)
    batch3 = root / "Imagenet16_train" / "train_data_batch_3"
    (root / "copy").mkdir()
    (root / "copy" / "train_data_batch_3").write_bytes(batch3.read_bytes())
    with pytest.raises(D.DatasetError, match=r"holds train_data_batch_3 more than once.*keep one copy"):
        D.load_image_dataset("imagenet16_120", root, train=True)
    (root / "copy" / "train_data_batch_3").unlink()
    batch3.unlink()
    with pytest.raises(D.DatasetError, match=r"incomplete ImageNet16-120 .*missing train_data_batch_3; "
                                             r"expected Downsampled ImageNet's batch files"):
        D.load_image_dataset("imagenet16_120", root, train=True)
    val = root / "Imagenet16_val" / "val_data"
    val.write_bytes(pickle.dumps({"data": os.getcwd}, protocol=2))
    with pytest.raises(D.DatasetError, match=r"val_data.*refusing to load posix.getcwd.*Imagenet16_val.zip"):
        D.load_image_dataset("imagenet16_120", root, train=False)
    val.write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [1, 2]}, protocol=2))
    with pytest.raises(D.DatasetError, match=r"val_data is not a 16×16 Downsampled ImageNet batch"):
        D.load_image_dataset("imagenet16_120", root, train=False)
    val.write_bytes(pickle.dumps({"data": np.zeros((2, 768), np.uint8), "labels": [0, 2]}, protocol=2))
    with pytest.raises(D.DatasetError, match=r"labels outside ImageNet's 1..1000 \(found 0..2\)"):
        D.load_image_dataset("imagenet16_120", root, train=False)
    val.write_bytes(pickle.dumps({"data": np.zeros((2, 768), np.uint8), "labels": [500, 999]}, protocol=2))
    with pytest.raises(D.DatasetError, match=r"validation batches hold no image of classes 1..120"):
        D.load_image_dataset("imagenet16_120", root, train=False)


def test_imagenet16_cannot_be_downloaded_and_says_where_to_get_it(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(D.DatasetError, match=r"no ImageNet16-120 found at .*empty \(the folder is empty\): "
                                             r"expected Downsampled ImageNet's batch files .*Imagenet16_train.zip"
                                             r".*\(ImageNet16-120 cannot be downloaded automatically\)"):
        D.load_image_dataset("imagenet16_120", tmp_path / "empty", train=True, download=True)


def test_download_calls_torchvision_then_reads_its_files(tmp_path: Path, monkeypatch) -> None:
    calls = []

    class FakeCIFAR10(torchvision.datasets.CIFAR10):    # torchvision's class, minus the network
        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append((root, train, download))
            _write_cifar(Path(root))

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    root = tmp_path / "fresh"
    arrays = D.load_image_dataset("cifar10", root, train=True, download=True)
    assert len(arrays) == 20 and calls == [(str(root), True, True)]

    class OfflineCIFAR10(torchvision.datasets.CIFAR10):
        def __init__(self, *args, **kwargs) -> None:
            raise OSError("Network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", OfflineCIFAR10)
    with pytest.raises(D.DatasetError, match=r"downloading CIFAR-10 into .*Network is unreachable"):
        D.load_image_dataset("cifar10", tmp_path / "other", train=True, download=True)


def test_download_leaves_an_existing_image_tree_alone(data_tree, monkeypatch) -> None:
    root, _ = data_tree

    class Offline(torchvision.datasets.CIFAR10):
        def __init__(self, *args, **kwargs) -> None:
            raise AssertionError("downloaded although the root has the data")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    assert len(D.load_image_dataset("cifar10", root, train=True, download=True, workers=1)) == 20


# ------------------------------------------------------------------------------------------------
# ImageFolder trees and archives

def test_image_tree_loads_in_imagefolder_order(data_tree) -> None:
    root, written = data_tree
    train = D.load_image_dataset("cifar10", root, train=True, workers=2)
    test = D.load_image_dataset("cifar10", root, train=False, workers=1)
    assert train.classes == CIFAR10_CLASSES and len(train) == 20 and len(test) == 20
    assert train.labels.tolist() == [c for c in range(10) for _ in range(2)]
    paths = [p for p in sorted(written) if p.parts[-3] == "train"]
    for i, path in enumerate(paths):
        got = train.images[i].permute(1, 2, 0).numpy()
        with Image.open(path) as im:      # Pillow's pixels, as torchvision's ImageFolder reads them
            assert np.array_equal(got, np.asarray(im.convert("RGB")))
        if path.suffix == ".png":         # lossless: the very pixels written
            assert np.array_equal(got, written[path])


def test_image_tree_decodes_in_worker_processes(tmp_path: Path, monkeypatch) -> None:
    _write_tree(tmp_path / "tree", per_class=3)
    serial = D.load_image_dataset("cifar10", tmp_path / "tree", train=True, workers=1)
    monkeypatch.setattr(D, "_CHUNK", 4)                     # 8 tasks over 2 processes
    pooled = D.load_image_dataset("cifar10", tmp_path / "tree", train=True, workers=2)
    assert torch.equal(serial.images, pooled.images) and torch.equal(serial.labels, pooled.labels)
    Image.fromarray(_images(1, 36)[0]).save(tmp_path / "tree" / "train" / "ship" / "big.png")
    with pytest.raises(D.DatasetError, match="big.png is 36×36 pixels"):   # raised in a worker
        D.load_image_dataset("cifar10", tmp_path / "tree", train=True, workers=2)


def test_image_tree_accepts_val_and_a_top_level_folder(tmp_path: Path) -> None:
    _write_tree(tmp_path / "wrap" / "cifar10", per_class=1, splits=("train", "val"))
    assert len(D.load_image_dataset("cifar10", tmp_path / "wrap", train=False, workers=1)) == 10


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_archives_extract_once_into_the_cache(data_tree, tmp_path: Path, kind: str, monkeypatch) -> None:
    root, _ = data_tree
    if kind == "tar.gz":
        archive = _tar(root, tmp_path / "c10.tar.gz")
    else:
        archive = tmp_path / "c10.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            for path in sorted(root.rglob("*")):
                zf.write(path, path.relative_to(root).as_posix())
    cache = tmp_path / "cache"
    arrays = D.load_image_dataset("cifar10", archive, train=True, cache_dir=cache, workers=1)
    assert torch.equal(arrays.images, D.load_image_dataset("cifar10", root, train=True).images)
    assert (cache / "c10" / ".nascore-extracted").is_file()

    def no_extraction(*args):
        raise AssertionError("extracted twice")

    monkeypatch.setattr(D, "_extract_tar", no_extraction)
    monkeypatch.setattr(D, "_extract_zip", no_extraction)
    assert len(D.load_image_dataset("cifar10", archive, train=False, cache_dir=cache, workers=1)) == 20


def test_parallel_runs_sharing_a_cache_extract_an_archive_once(data_tree, tmp_path: Path, monkeypatch) -> None:
    """A second process arriving mid-extraction waits for the first, then reads its files (it used
    to delete the half-written folder and extract again under the first one's feet)."""
    import threading
    import time
    archive = _tar(data_tree[0], tmp_path / "c10.tgz", top=None)
    real, calls = D._extract_tar, []

    def slow_extract(src, dest):
        calls.append(dest)
        real(src, dest)
        time.sleep(0.5)                   # the marker is not written yet: the others must wait

    monkeypatch.setattr(D, "_extract_tar", slow_extract)
    results, errors = [], []

    def load():
        try:
            results.append(len(D.load_image_dataset("cifar10", archive, train=True, cache_dir=tmp_path / "cache",
                                                    workers=1)))
        except Exception as e:            # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=load) for _ in range(3)]   # flock: each open() its own lock
    for t in threads:
        t.start()
        time.sleep(0.1)
    for t in threads:
        t.join()
    assert not errors and results == [20, 20, 20] and len(calls) == 1


def test_interrupted_extraction_is_redone(data_tree, tmp_path: Path) -> None:
    archive = _tar(data_tree[0], tmp_path / "c10.tgz", top=None)
    cache = tmp_path / "cache"
    (cache / "c10" / "train").mkdir(parents=True)              # a partial extraction, no marker
    (cache / "c10" / "train" / "junk.txt").write_text("half")
    assert len(D.load_image_dataset("cifar10", archive, train=True, cache_dir=cache, workers=1)) == 20
    assert not (cache / "c10" / "train" / "junk.txt").exists()


def _tar_with(out: Path, member: tarfile.TarInfo, payload: bytes = b"x") -> Path:
    with tarfile.open(out, "w:gz") as tar:
        tar.addfile(member, io.BytesIO(payload) if member.isfile() else None)
    return out


@pytest.mark.parametrize("name,kind", [("../escape.jpg", tarfile.REGTYPE),
                                       ("/abs/escape.jpg", tarfile.REGTYPE),
                                       ("train/a/link.jpg", tarfile.SYMTYPE),
                                       ("train/a/hard.jpg", tarfile.LNKTYPE)])
def test_unsafe_archive_members_are_refused(tmp_path: Path, name: str, kind: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.type, member.size = kind, 1 if kind == tarfile.REGTYPE else 0
    member.linkname = "/etc/passwd" if kind != tarfile.REGTYPE else ""
    archive = _tar_with(tmp_path / "bad.tar.gz", member)
    with pytest.raises(D.DatasetError, match="refusing to extract"):
        D.load_image_dataset("cifar10", archive, train=True, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "escape.jpg").exists()


def test_unsafe_zip_members_are_refused(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as zf:
        zf.writestr("../escape.jpg", b"x")
    with pytest.raises(D.DatasetError, match=r"unsafe path '../escape.jpg'.*refusing to extract"):
        D.load_image_dataset("cifar10", tmp_path / "bad.zip", train=True, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "escape.jpg").exists()


def test_damaged_archive_says_fetch_again(data_tree, tmp_path: Path) -> None:
    archive = _tar(data_tree[0], tmp_path / "c10.tar.gz")
    (tmp_path / "cut.tar.gz").write_bytes(archive.read_bytes()[:3000])
    with pytest.raises(D.DatasetError, match="damaged or truncated"):
        D.load_image_dataset("cifar10", tmp_path / "cut.tar.gz", train=True, cache_dir=tmp_path / "c")


# ------------------------------------------------------------------------------------------------
# Roots that hold no dataset: the message says what was expected where, and how to get it

def test_missing_empty_and_wrong_roots_explain_themselves(tmp_path: Path) -> None:
    expected = r"expected torchvision's cifar-10-batches-py/ or an ImageFolder tree train/<class>/"
    how = r"set data.download: true .* point data.root at an ImageFolder tree or archive"
    missing = r"no CIFAR-10 found at .*nowhere \(the path does not exist\): "
    with pytest.raises(D.DatasetError, match=rf"{missing}{expected}.*{how}"):
        D.load_image_dataset("cifar10", tmp_path / "nowhere", train=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(D.DatasetError, match=r"\(the folder is empty\)"):
        D.load_image_dataset("cifar10", tmp_path / "empty", train=True)
    (tmp_path / "wrong" / "images").mkdir(parents=True)
    (tmp_path / "wrong" / "labels.csv").write_text("a,b\n")
    with pytest.raises(D.DatasetError, match=r"\(found images/, labels.csv\)"):
        D.load_image_dataset("cifar10", tmp_path / "wrong", train=True)
    (tmp_path / "notes.txt").write_text("not an archive")
    with pytest.raises(D.DatasetError, match="not a .tar, .tar.gz, .tgz or .zip archive"):
        D.load_image_dataset("cifar10", tmp_path / "notes.txt", train=True)
    with pytest.raises(D.DatasetError, match="cannot be downloaded automatically"):
        D.image_files("imagenet", tmp_path / "empty", train=True)


def test_archive_needs_a_cache_folder(data_tree, tmp_path: Path) -> None:
    archive = _tar(data_tree[0], tmp_path / "c10.tar.gz")
    with pytest.raises(D.DatasetError, match=r"is an archive: pass cache_dir, a folder to extract it into"):
        D.load_image_dataset("cifar10", archive, train=True)


def test_wrong_images_or_classes_are_named(tmp_path: Path) -> None:
    _write_tree(tmp_path / "big", per_class=1, size=40)
    with pytest.raises(D.DatasetError, match=r"0000.png is 40×40 pixels; CIFAR-10 images must be 32×32"):
        D.load_image_dataset("cifar10", tmp_path / "big", train=True, workers=1)
    _write_tree(tmp_path / "nine", classes=CIFAR10_CLASSES[:9], per_class=1)
    with pytest.raises(D.DatasetError, match="has 9 class folders, CIFAR-10 has 10"):
        D.load_image_dataset("cifar10", tmp_path / "nine", train=True)
    _write_tree(tmp_path / "odd", per_class=1)
    (tmp_path / "odd" / "test" / "truck").rename(tmp_path / "odd" / "test" / "lorry")
    with pytest.raises(D.DatasetError, match="both splits need the same classes"):
        D.load_image_dataset("cifar10", tmp_path / "odd", train=False)
    _write_tree(tmp_path / "notest", per_class=1, splits=("train",))
    with pytest.raises(D.DatasetError, match="no test/ or val/ folder"):
        D.load_image_dataset("cifar10", tmp_path / "notest", train=False)


@pytest.mark.slow
def test_real_cifar10_jpeg_archive(tmp_path: Path) -> None:
    if not REAL_CIFAR10.is_file():
        pytest.skip(f"{REAL_CIFAR10} is not here")
    t0 = time.perf_counter()
    train = D.load_image_dataset("cifar10", REAL_CIFAR10, train=True, cache_dir=tmp_path)
    test = D.load_image_dataset("cifar10", REAL_CIFAR10, train=False, cache_dir=tmp_path)
    print(f"real CIFAR-10: extracted and decoded in {time.perf_counter() - t0:.1f} s")
    assert train.images.shape == (50_000, 3, 32, 32) and test.images.shape == (10_000, 3, 32, 32)
    assert train.classes == CIFAR10_CLASSES
    assert torch.bincount(train.labels).tolist() == [5000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    mean = train.images.float().mean(dim=(0, 2, 3)) / 255    # README: 0.4913 / 0.4821 / 0.4465
    assert torch.allclose(mean, torch.tensor([0.4913, 0.4821, 0.4465]), atol=5e-4)


# ------------------------------------------------------------------------------------------------
# Synthetic data

def test_synthetic_is_deterministic_uint8_and_balanced() -> None:
    a_train, a_test = D.synthetic_dataset(num_classes=5, n_train=100, n_test=20, seed=3)
    b_train, _ = D.synthetic_dataset(num_classes=5, n_train=100, n_test=20, seed=3)
    c_train, _ = D.synthetic_dataset(num_classes=5, n_train=100, n_test=20, seed=4)
    assert torch.equal(a_train.images, b_train.images) and torch.equal(a_train.labels, b_train.labels)
    assert not torch.equal(a_train.images, c_train.images)
    assert a_train.images.shape == (100, 3, 32, 32) and a_train.images.dtype == torch.uint8
    assert torch.bincount(a_train.labels).tolist() == [20] * 5 and len(a_test) == 20
    assert len(D.load_image_dataset("synthetic", None, train=False, seed=3)) == 512


def test_synthetic_is_learnable_by_a_small_cnn() -> None:
    train, test = D.synthetic_dataset(n_train=1024, n_test=256, seed=0)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(),
                              torch.nn.Linear(256, 10))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    loader = D.ResidentLoader(train, batch_size=64, augment=True, seed=0)
    for step, (x, y) in enumerate(loader.forever()):
        if step == 48:
            break
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    x, y = next(iter(D.ResidentLoader(test, batch_size=256, shuffle=False, augment=False)))
    with torch.no_grad():
        accuracy = (net(x).argmax(1) == y).float().mean().item()
    print(f"synthetic test accuracy after 48 steps: {accuracy:.3f}")
    assert accuracy > 0.5, accuracy       # chance is 0.1


# ------------------------------------------------------------------------------------------------
# Prepared arrays

def test_prepared_round_trip(tmp_path: Path) -> None:
    train, test = D.synthetic_dataset(num_classes=4, n_train=40, n_test=12)
    D.save_prepared(tmp_path, {"train": train, "test": test})
    loaded = D.load_prepared(tmp_path, "train")
    assert torch.equal(loaded.images, train.images) and torch.equal(loaded.labels, train.labels)
    assert (loaded.name, loaded.classes, loaded.mean, loaded.std) == (
        train.name, train.classes, train.mean, train.std)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["splits"] == {"train": [40, 3, 32, 32], "test": [12, 3, 32, 32]}
    with pytest.raises(D.DatasetError, match="no 'val' split"):
        D.load_prepared(tmp_path, "val")


def test_prepared_damage_names_the_file(tmp_path: Path) -> None:
    train, test = D.synthetic_dataset(num_classes=4, n_train=40, n_test=12)
    D.save_prepared(tmp_path, {"train": train, "test": test})
    images = tmp_path / "train_images.npy"
    images.write_bytes(images.read_bytes()[:1000])
    with pytest.raises(D.DatasetError,
                       match=r"train_images.npy is missing or damaged.*rerun the prepare stage"):
        D.load_prepared(tmp_path, "train")
    (tmp_path / "test_labels.npy").unlink()
    with pytest.raises(D.DatasetError, match=r"test_labels.npy is missing.*rerun the prepare stage"):
        D.load_prepared(tmp_path, "test")
    np.save(tmp_path / "test_labels.npy", np.zeros(5, np.int64))
    with pytest.raises(D.DatasetError,
                       match=r"test_labels.npy holds int64 \(5,\), meta.json says int64 \(12,\)"):
        D.load_prepared(tmp_path, "test")
    (tmp_path / "meta.json").unlink()
    with pytest.raises(D.DatasetError, match=r"meta.json is missing.*rerun the prepare stage"):
        D.load_prepared(tmp_path, "test")


# ------------------------------------------------------------------------------------------------
# Search split

def test_search_split_is_a_seeded_disjoint_cover(tmp_path: Path) -> None:
    split = D.search_split(1001, seed=2)
    assert len(split.weights) == 500 and len(split.arch) == 501
    assert sorted(torch.cat([split.weights, split.arch]).tolist()) == list(range(1001))
    assert torch.equal(D.search_split(1001, seed=2).weights, split.weights)
    assert not torch.equal(D.search_split(1001, seed=3).weights, split.weights)
    assert len(D.search_split(100, fraction=0.8).weights) == 80
    D.save_split(tmp_path / "split.json", split)
    loaded = D.load_split(tmp_path / "split.json", 1001)
    assert torch.equal(loaded.weights, split.weights) and torch.equal(loaded.arch, split.arch)
    with pytest.raises(D.DatasetError, match="made for 1001 training images, the dataset has 1000"):
        D.load_split(tmp_path / "split.json", 1000)
    data = json.loads((tmp_path / "split.json").read_text())
    data["arch"][0] = data["weights"][0]
    (tmp_path / "split.json").write_text(json.dumps(data))
    with pytest.raises(D.DatasetError, match="shared between halves"):
        D.load_split(tmp_path / "split.json", 1001)
    with pytest.raises(ValueError, match="fraction"):
        D.search_split(10, fraction=1.0)


def test_split_rules_follow_methods_md_per_space() -> None:
    # §2.1: the DARTS-family spaces split the training set in order; §1.3: NB201 a fixed random
    # half on CIFAR-10, α from a fixed half of the test set on CIFAR-100
    for space in ("darts", "s1", "s2", "s3", "s4"):
        for dataset in ("cifar10", "cifar100", "svhn"):
            assert D.split_rule("auto", space, dataset) == "first_half"
    assert D.split_rule("auto", "nb201", "cifar10") == "random"
    assert D.split_rule("auto", "nb201", "svhn") == "random"
    assert D.split_rule("auto", "nb201", "cifar100") == "test_half"
    assert D.split_rule("auto", "nb201", "imagenet16_120") == "test_half"   # arch-val: half its test set
    assert D.split_rule("random", "darts", "cifar10") == "random"          # an explicit rule wins


def test_first_half_split_takes_the_training_set_in_order() -> None:
    split = D.search_split(1001, rule="first_half", seed=7)
    assert split.weights.tolist() == list(range(500)) and split.arch.tolist() == list(range(500, 1001))
    assert split.rule == "first_half" and split.arch_from == "train"


def test_test_half_split_trains_w_on_everything_and_alpha_on_half_the_test_set(tmp_path: Path) -> None:
    split = D.search_split(1000, rule="test_half", num_test=101, seed=3)
    assert split.weights.tolist() == list(range(1000))
    assert len(split.arch) == 50 and len(split.arch.unique()) == 50 and int(split.arch.max()) < 101
    assert split.arch_from == "test" and split.num_test == 101
    assert torch.equal(D.search_split(1000, rule="test_half", num_test=101, seed=3).arch, split.arch)
    assert not torch.equal(D.search_split(1000, rule="test_half", num_test=101, seed=4).arch, split.arch)
    D.save_split(tmp_path / "split.json", split)
    loaded = D.load_split(tmp_path / "split.json", 1000, 101)
    assert torch.equal(loaded.arch, split.arch) and loaded.arch_from == "test" and loaded.rule == "test_half"
    with pytest.raises(D.DatasetError, match="made for 101 test images, the dataset has 100"):
        D.load_split(tmp_path / "split.json", 1000, 100)
    with pytest.raises(ValueError, match="test_half needs a test set"):
        D.search_split(1000, rule="test_half")
    with pytest.raises(ValueError, match="unknown split rule 'last_half'; allowed: first_half, random"):
        D.search_split(1000, rule="last_half")


def test_a_split_file_from_before_the_rules_reads_as_a_random_training_split(tmp_path: Path) -> None:
    split = D.search_split(100, seed=1)
    data = {"num_samples": 100, "seed": 1, "weights": split.weights.tolist(), "arch": split.arch.tolist()}
    (tmp_path / "split.json").write_text(json.dumps(data))
    loaded = D.load_split(tmp_path / "split.json", 100, 20)
    assert (loaded.rule, loaded.arch_from) == ("random", "train") and torch.equal(loaded.arch, split.arch)


# ------------------------------------------------------------------------------------------------
# Augmentation functions

def test_crop_is_a_translation_of_the_padded_image() -> None:
    x = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    offsets = torch.tensor([[0, 0], [4, 4], [1, 3]])
    out = aug.crop(x, 2, offsets)
    padded = F.pad(x, (2, 2, 2, 2))
    for b, (dy, dx) in enumerate(offsets.tolist()):
        assert torch.equal(out[b], padded[b, :, dy:dy + 8, dx:dx + 8])
    assert torch.equal(out[1, :, :6, :6], x[1, :, 2:, 2:])           # shifted, zeros enter
    assert out[1, :, 6:].eq(0).all() and out.shape == x.shape and out.dtype == torch.uint8


def test_flip_mirrors_only_flagged_images() -> None:
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    out = aug.flip(x, torch.tensor([True, False]))
    assert torch.equal(out[0], x[0, :, :, [4, 3, 2, 1, 0]]) and torch.equal(out[1], x[1])


def _darts_cutout_mask(h: int, w: int, cy: int, cx: int, length: int) -> np.ndarray:
    """The reference implementation's Cutout, with the centre given instead of drawn."""
    mask = np.ones((h, w), np.float32)
    y1, y2 = np.clip(cy - length // 2, 0, h), np.clip(cy + length // 2, 0, h)
    x1, x2 = np.clip(cx - length // 2, 0, w), np.clip(cx + length // 2, 0, w)
    mask[y1:y2, x1:x2] = 0.0
    return mask


def test_cutout_zeroes_one_clipped_square_per_image() -> None:
    x = torch.randn(4, 3, 32, 32) + 10                                   # no natural zeros
    centres = torch.tensor([[16, 16], [0, 0], [31, 5], [20, 31]])
    out = aug.cutout(x, 16, centres)
    for b, (cy, cx) in enumerate(centres.tolist()):
        mask = torch.from_numpy(_darts_cutout_mask(32, 32, cy, cx, 16))
        assert torch.equal(out[b], x[b] * mask)
    assert (out[0] == 0).sum() == 3 * 16 * 16 and (out[1] == 0).sum() == 3 * 8 * 8
    assert torch.equal(aug.cutout(x, 0, centres), x)


def test_normalize_matches_to_tensor_and_normalize() -> None:
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    want = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(aug.normalize(x, mean, std), want)


# ------------------------------------------------------------------------------------------------
# ResidentLoader

@pytest.fixture
def data_arrays() -> D.ImageArrays:
    return D.synthetic_dataset(num_classes=10, n_train=100, n_test=10, seed=1)[0]


def _epoch(loader: D.Loader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return list(loader)


def test_resident_batches_have_the_training_shape(data_arrays) -> None:
    loader = D.ResidentLoader(data_arrays, batch_size=32, cutout=16, seed=0)
    batches = list(loader)
    assert len(loader) == len(batches) == 4
    assert [len(y) for _, y in batches] == [32, 32, 32, 4]
    x, y = batches[0]
    assert x.dtype == torch.float32 and x.shape == (32, 3, 32, 32) and x.is_contiguous()
    assert y.dtype == torch.int64
    lo = (0 - torch.tensor(data_arrays.mean)) / torch.tensor(data_arrays.std)
    hi = (1 - torch.tensor(data_arrays.mean)) / torch.tensor(data_arrays.std)
    assert (x.amin(dim=(0, 2, 3)) >= lo - 1e-5).all() and (x.amax(dim=(0, 2, 3)) <= hi + 1e-5).all()
    assert len(D.ResidentLoader(data_arrays, batch_size=32, drop_last=True)) == 3
    assert D.ResidentLoader(data_arrays, batch_size=32, channels_last=True).__iter__().__next__()[0] \
        .is_contiguous(memory_format=torch.channels_last)


def test_resident_epochs_replay_from_seed_and_epoch(data_arrays) -> None:
    loader = D.ResidentLoader(data_arrays, batch_size=25, cutout=16, seed=7)
    first = _epoch(loader, 3)
    again = _epoch(D.ResidentLoader(data_arrays, batch_size=25, cutout=16, seed=7), 3)
    other = _epoch(loader, 4)
    for (xa, ya), (xb, yb) in zip(first, again):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(first[0][0], other[0][0])
    assert not torch.equal(first[0][0], _epoch(D.ResidentLoader(data_arrays, batch_size=25, seed=8), 3)[0][0])


def test_replacement_draws_a_seeded_order_with_repeats(data_arrays) -> None:
    draws = D.epoch_order(1000, seed=1, epoch=2, shuffle=True, replacement=True)
    assert len(draws) == 1000 and int(draws.min()) >= 0 and int(draws.max()) < 1000
    assert len(set(draws.tolist())) < 800                   # ~632 distinct expected: repeats, misses
    assert torch.equal(draws, D.epoch_order(1000, seed=1, epoch=2, shuffle=True, replacement=True))
    assert not torch.equal(draws, D.epoch_order(1000, seed=1, epoch=3, shuffle=True, replacement=True))
    with pytest.raises(ValueError, match="needs shuffle=True"):
        D.epoch_order(10, seed=0, epoch=0, shuffle=False, replacement=True)
    loader = D.ResidentLoader(data_arrays, batch_size=20, seed=3, drop_last=True)
    loader.replacement = True
    labels = torch.cat([y for _, y in _epoch(loader, 1)])
    order = D.epoch_order(len(data_arrays.labels), seed=3, epoch=1, shuffle=True, replacement=True)
    assert torch.equal(labels, data_arrays.labels[order[:len(labels)]])


def test_resident_without_augmentation_gives_the_normalised_images(data_arrays) -> None:
    loader = D.ResidentLoader(data_arrays, batch_size=30, shuffle=False, augment=False)
    x = torch.cat([x for x, _ in loader])
    y = torch.cat([y for _, y in loader])
    assert torch.equal(x, aug.normalize(data_arrays.images, data_arrays.mean, data_arrays.std))
    assert torch.equal(y, data_arrays.labels)
    with pytest.raises(ValueError, match="cutout is part of the training augmentation"):
        D.ResidentLoader(data_arrays, batch_size=8, augment=False, cutout=16)


def test_resident_augmentation_is_crop_flip_then_cutout(data_arrays) -> None:
    """Rebuild an epoch's first batch from the documented recipe and the epoch's draws."""
    loader = D.ResidentLoader(data_arrays, batch_size=16, cutout=8, crop_padding=4, seed=5)
    x, y = _epoch(loader, 2)[0]
    index = D.epoch_order(100, seed=5, epoch=2, shuffle=True)[:16]
    draws = aug.draw_augmentation(100, 32, 4, D._generator(5, 2, D._AUGMENT)).take(index)
    raw = data_arrays.images[index]
    want = aug.flip(aug.crop(raw, 4, draws.offsets), draws.flips)
    want = aug.cutout(aug.normalize(want, data_arrays.mean, data_arrays.std), 8, draws.centres)
    assert torch.equal(x, want) and torch.equal(y, data_arrays.labels[index])
    assert draws.flips.any() and not draws.flips.all()


@pytest.mark.parametrize("channels_last", [False, True])
def test_resident_batches_take_a_handful_of_kernels_in_the_layout_asked_for(data_arrays, channels_last) -> None:
    """Each batch is on the device's stream beside a step of ~1,200 kernels: 12 with cutout where
    composing crop, flip, normalize and cutout and gathering the batch's draws and labels took 37
    (18 of them cutout's clamps and comparisons), and no copy to convert the layout."""
    loader = D.ResidentLoader(data_arrays, batch_size=16, cutout=8, seed=5, channels_last=channels_last)
    batches = iter(loader)
    next(batches)                                   # the epoch's draws and orders: once per epoch
    with CountOps() as counter:
        x, _ = next(batches)
    views = {"unsqueeze", "slice", "select", "view", "permute", "expand", "alias"}
    assert sum(n for op, n in counter.count.items() if op not in views) <= 12, counter.count
    assert "clone" not in counter.count and "copy_" not in counter.count
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert x.is_contiguous(memory_format=fmt)


def test_resident_augmentation_of_images_wider_than_tall() -> None:
    """Cutout centres are drawn across the width, for rows too: a hole centred below a short
    image's last row is clipped away, as the composed recipe clips it."""
    images = torch.randint(0, 256, (12, 3, 8, 16), dtype=torch.uint8)
    data = D.ImageArrays("cifar10", images, torch.arange(12) % 10, tuple(map(str, range(10))),
                         (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    loader = D.ResidentLoader(data, batch_size=12, cutout=4, crop_padding=2, seed=1, shuffle=False)
    x, _ = next(iter(loader))
    draws = aug.draw_augmentation(12, 16, 2, D._generator(1, 0, D._AUGMENT))
    assert (draws.centres[:, 0] >= 8).any()                # some rows' centres beyond the image
    want = aug.flip(aug.crop(images, 2, draws.offsets), draws.flips)
    assert torch.equal(x, aug.cutout(aug.normalize(want, data.mean, data.std), 4, draws.centres))


def test_resident_index_subset_and_forever(data_arrays) -> None:
    split = D.search_split(100, seed=0)
    loader = D.ResidentLoader(data_arrays, batch_size=20, indices=split.arch, shuffle=False,
                              augment=False)
    y = torch.cat([y for _, y in loader])
    assert torch.equal(y, data_arrays.labels[split.arch])
    cycling = D.ResidentLoader(data_arrays, batch_size=40, indices=split.weights, drop_last=True, seed=1)
    stream = cycling.forever(start_epoch=10)
    passes = [[next(stream)[1] for _ in range(len(cycling))] for _ in range(3)]
    assert cycling.epoch == 12
    assert not torch.equal(passes[0][0], passes[1][0])          # reshuffled every pass
    assert torch.equal(passes[1][0], _epoch(cycling, 11)[0][1])  # pass p replays epoch start + p


def test_sharding_gives_disjoint_equal_shards_of_one_order(data_arrays) -> None:
    shards = [D.epoch_order(101, seed=3, epoch=5, shuffle=True, rank=r, world_size=2) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 50
    assert not set(shards[0].tolist()) & set(shards[1].tolist())
    full = D.epoch_order(101, seed=3, epoch=5, shuffle=True)
    assert sorted(torch.cat(shards).tolist()) == sorted(full[:100].tolist())
    eval_shards = [D.epoch_order(101, seed=3, epoch=5, shuffle=False, rank=r, world_size=2) for r in (0, 1)]
    assert sorted(torch.cat(eval_shards).tolist()) == list(range(101))     # evaluation sees all
    loaders = [D.ResidentLoader(data_arrays, batch_size=16, seed=3, rank=r, world_size=2) for r in (0, 1)]
    ys = [[y for _, y in _epoch(ld, 1)] for ld in loaders]
    assert len(loaders[0]) == len(loaders[1]) == 4 and [len(b) for b in ys[0]] == [16, 16, 16, 2]
    with pytest.raises(ValueError, match="rank 2 is outside world size 2"):
        D.ResidentLoader(data_arrays, batch_size=8, rank=2, world_size=2)


def test_negative_epochs_are_valid_fixed_orders(data_arrays) -> None:
    loader = D.ResidentLoader(data_arrays, batch_size=50, seed=0)
    assert torch.equal(_epoch(loader, -1)[0][1], _epoch(loader, -1)[0][1])
    assert not torch.equal(_epoch(loader, -1)[0][1], _epoch(loader, -2)[0][1])


# ------------------------------------------------------------------------------------------------
# FolderLoader (the ImageNet path, here at 32 px)

def test_folder_loader_replays_epochs_whatever_the_workers(data_tree) -> None:
    root, _ = data_tree
    files = D.image_files("cifar10", root, train=True, image_size=24)
    assert files.classes == CIFAR10_CLASSES and files.root == root / "train"
    loader = D.FolderLoader(files, batch_size=8, seed=4, workers=0)
    assert len(loader) == 3
    first = _epoch(loader, 1)
    x, y = first[0]
    assert x.shape == (8, 3, 24, 24) and x.dtype == torch.float32 and y.dtype == torch.int64
    with_workers = _epoch(D.FolderLoader(files, batch_size=8, seed=4, workers=2), 1)
    for (xa, ya), (xb, yb) in zip(first, with_workers, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(first[0][0], _epoch(loader, 2)[0][0])
    rng_before = torch.get_rng_state()
    _epoch(loader, 1)
    assert torch.equal(rng_before, torch.get_rng_state())      # the caller's stream is untouched


def test_folder_loader_eval_is_ordered_and_sharded(data_tree) -> None:
    files = D.image_files("cifar10", data_tree[0], train=False, image_size=32)
    assert files.root == data_tree[0] / "test"
    shards = [D.FolderLoader(files, batch_size=4, shuffle=False, augment=False, rank=r, world_size=3,
                             workers=0) for r in range(3)]
    labels = [torch.cat([y for _, y in ld]).tolist() for ld in shards]
    assert [len(ld) for ld in shards] == [2, 2, 2] and sum(map(len, labels)) == 20
    assert labels[0] == [c for c in range(10) for _ in range(2)][0::3]


def test_make_loader_picks_the_loader_for_the_source(data_arrays, data_tree) -> None:
    train = D.make_loader(data_arrays, batch_size=10, train=True, cutout=16)
    evaluate = D.make_loader(data_arrays, batch_size=10, train=False, cutout=16)
    assert isinstance(train, D.ResidentLoader) and train.augment and train.cutout == 16
    assert not evaluate.augment and evaluate.cutout == 0 and not evaluate.shuffle
    files = D.image_files("cifar10", data_tree[0], train=True, image_size=16)
    assert isinstance(D.make_loader(files, batch_size=4, train=True, workers=0), D.FolderLoader)
