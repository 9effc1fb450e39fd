"""Datasets, the search split, and loaders that replay an epoch from (seed, epoch).

Two ways in, one batch protocol out:
- 32×32 sets (CIFAR-10/100, SVHN, synthetic) are decoded once into uint8 arrays (`ImageArrays`),
  stored by the prepare stage as .npy files, and served by `ResidentLoader`: the whole set lives on
  the training device and crop / flip / cutout run batched there (methods.md §1.1).
  ImageNet16-120 (NB201's third dataset) takes the same path at 16×16.
- Full-resolution ImageFolder trees (ImageNet) stay files (`ImageFiles`) and are served by
  `FolderLoader`: torchvision transforms in DataLoader workers (methods.md §1.1, ImageNet column).

Both yield `(x, y)`: x float32 normalised (B, 3, H, W) on the device, y int64. `set_epoch(epoch)`
makes an epoch's order and augmentation a pure function of (seed, epoch), so a resumed run replays
identical batches; with `rank`/`world_size` each rank gets a disjoint shard of the same order.

Sources for a dataset root, detected from what is there: torchvision's own files (downloaded with
`download=True`), Downsampled ImageNet's pickled batches (ImageNet16-120), an ImageFolder tree
`train/<class>/…` + `test/<class>/…` (or `val/`), or a .tar/.tar.gz/.tgz/.zip archive of either,
extracted once into a cache folder.
"""
from __future__ import annotations

import fcntl
import json
import math
import multiprocessing as mp
import os
import pickle
import shutil
import stat
import tarfile
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from . import augment as aug
from .io import atomic_path, write_json
from .registry import Registry

# torchvision is imported where it is used: importing it costs ~1.5 s, and most stages only read
# prepared arrays.

Batch = tuple[torch.Tensor, torch.Tensor]
Triple = tuple[float, float, float]


class DatasetError(ValueError):
    """A dataset that is missing, incomplete or malformed; the message says what to do about it."""


# ------------------------------------------------------------------------------------------------
# Registry

@dataclass(frozen=True)
class DatasetInfo:
    """What nascore needs to know about a dataset; `in_memory` sets are served by ResidentLoader."""

    name: str
    title: str                      # for messages: "CIFAR-10"
    num_classes: int
    image_size: int                 # training resolution (the crop size for ImageNet)
    mean: Triple
    std: Triple
    in_memory: bool
    train_size: int | None          # training images (None: set by the generator's arguments)
    torchvision: str | None = None  # torchvision.datasets class that downloads it, if any
    test_size: int | None = None    # test (ImageNet: validation) images
    crop_padding: int = 4           # zero padding of the training random crop
    downsampled: bool = False       # read from Downsampled ImageNet's pickled batches


DATASETS: Registry[DatasetInfo] = Registry("dataset")


def _add(info: DatasetInfo) -> None:
    DATASETS.register(info.name, info)


# mean/std: methods.md §1.1 (CIFAR-10), §1.2 (CIFAR-100, SVHN); ImageNet's usual statistics
_add(DatasetInfo("cifar10", "CIFAR-10", 10, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                 in_memory=True, train_size=50_000, torchvision="CIFAR10", test_size=10_000))
_add(DatasetInfo("cifar100", "CIFAR-100", 100, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                 in_memory=True, train_size=50_000, torchvision="CIFAR100", test_size=10_000))
_add(DatasetInfo("svhn", "SVHN", 10, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970),
                 in_memory=True, train_size=73_257, torchvision="SVHN", test_size=26_032))    # `train` split, no `extra`
# NB201's ImageNet16-120 (methods.md §1.3): the 16×16 Downsampled ImageNet restricted to its first
# 120 classes; statistics, crop padding 2 and sizes as in the NB201 benchmark's own code
_add(DatasetInfo("imagenet16_120", "ImageNet16-120", 120, 16,
                 (122.68 / 255, 116.66 / 255, 104.01 / 255), (63.22 / 255, 61.26 / 255, 65.09 / 255),
                 in_memory=True, train_size=151_700, test_size=6_000, crop_padding=2, downsampled=True))
_add(DatasetInfo("imagenet", "ImageNet", 1000, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                 in_memory=False, train_size=1_281_167, test_size=50_000))
# the generator's pixel statistics, rounded (uniform random colours, light noise)
_add(DatasetInfo("synthetic", "synthetic", 10, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), in_memory=True,
                 train_size=None))


def dataset_info(name: str) -> DatasetInfo:
    """The registry entry for `name`; an unknown name raises an error listing the known ones."""
    return DATASETS.get(name)


@dataclass(frozen=True)
class ImageArrays:
    """A decoded split: images uint8 (N, 3, H, W), labels int64 (N,) indexing `classes`."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    mean: Triple
    std: Triple

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise DatasetError(f"{self.name}: images must be uint8 (N, 3, H, W), got "
                               f"{self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise DatasetError(f"{self.name}: labels must be int64 ({len(self.images)},), got "
                               f"{self.labels.dtype} {tuple(self.labels.shape)}")
        if len(self.labels) and not 0 <= int(self.labels.min()) <= int(self.labels.max()) < len(self.classes):
            raise DatasetError(f"{self.name}: labels outside 0..{len(self.classes) - 1}")

    def __len__(self) -> int:
        return len(self.labels)


def dataset_crop_padding(data: ImageArrays) -> int:
    """The training random crop's zero padding for `data`: its dataset's (4 px; ImageNet16-120 2)."""
    return DATASETS.get(data.name).crop_padding if data.name in DATASETS else 4


@dataclass(frozen=True)
class ImageFiles:
    """One split of an ImageFolder tree read from disk at full resolution (e.g. ImageNet's train/)."""

    name: str
    root: Path                      # the split folder, holding <class>/ sub-folders
    classes: tuple[str, ...]
    mean: Triple
    std: Triple
    image_size: int                 # crop size fed to the network


# ------------------------------------------------------------------------------------------------
# Entry points

def load_image_dataset(name: str, root: str | Path | None, *, train: bool, download: bool = False,
                       cache_dir: str | Path | None = None, seed: int = 0,
                       workers: int | None = None) -> ImageArrays:
    """Decode one split of a 32×32 dataset into memory.

    `root` may hold torchvision's files, Downsampled ImageNet's batches (ImageNet16-120), an
    ImageFolder tree, or be an archive of one (extracted into `cache_dir`). With `download`, torchvision fetches the set when the root has none of
    these (and verifies its md5s). `synthetic` ignores root and is generated from `seed`.
    `workers` processes decode image files (default: one per available core).
    """
    info = dataset_info(name)
    if info.name == "synthetic":
        return synthetic_dataset(seed=seed)[0 if train else 1]
    if not info.in_memory:
        raise DatasetError(f"{info.title} is read from image files, not decoded into memory: "
                           f"use image_files() and FolderLoader")
    if root is None:
        raise DatasetError(f"{info.title} needs data.root (a folder or an archive)")
    root = Path(root)
    source = _find_source(info, root, cache_dir)
    if download and info.torchvision and (source is None or source[0] == "torchvision"):
        _download(info, root, train)      # a no-op when torchvision finds its files intact
        source = ("torchvision", root)
    if source is None:
        raise _not_found(info, root)
    kind, path = source
    if kind == "torchvision":
        images, labels, classes = _read_torchvision(info, path, train)
    elif kind == "downsampled":
        images, labels, classes = _read_downsampled(info, path, train)
    else:
        images, labels, classes = _read_image_tree(info, path, train, workers)
    return ImageArrays(info.name, images, labels, classes, info.mean, info.std)


def image_files(name: str, root: str | Path, *, train: bool, cache_dir: str | Path | None = None,
                image_size: int | None = None) -> ImageFiles:
    """One split of an ImageFolder tree (or an archive of one) for `FolderLoader`.

    The class list comes from train/ for both splits, so labels agree between them.
    `image_size` overrides the dataset's crop size (small values make fast tests).
    """
    info = dataset_info(name)
    root = Path(root)
    source = _find_source(info, root, cache_dir)
    if source is None or source[0] != "tree":
        raise _not_found(info, root, tree_only=True)
    split_dir, classes = _split_folder(info, source[1], train)
    return ImageFiles(info.name, split_dir, classes, info.mean, info.std,
                      image_size or info.image_size)


# ------------------------------------------------------------------------------------------------
# Finding what a root holds

Source = tuple[Literal["torchvision", "downsampled", "tree"], Path]
_MARKER = ".nascore-extracted"


def _find_source(info: DatasetInfo, root: Path, cache_dir: str | Path | None) -> Source | None:
    """What `root` holds for this dataset, or None when it holds nothing usable."""
    if root.is_file():
        if not (tarfile.is_tarfile(root) or zipfile.is_zipfile(root)):
            raise DatasetError(f"{root} is a file but not a .tar, .tar.gz, .tgz or .zip archive; "
                               f"point data.root at a dataset folder or an archive")
        if cache_dir is None:
            raise DatasetError(f"{root} is an archive: pass cache_dir, a folder to extract it into")
        extracted = extract_archive(root, cache_dir)
        if info.downsampled and _downsampled_files(extracted):
            return "downsampled", extracted
        tree = _image_tree(extracted)
        if tree is None:
            batches = f"{DOWNSAMPLED_LAYOUT} or " if info.downsampled else ""
            raise DatasetError(f"archive {root} holds no {info.title}: expected {batches}an ImageFolder "
                               f"tree train/<class>/… (+ test/<class>/…), possibly inside one "
                               f"top-level folder; found {_listing(extracted)}")
        return "tree", tree
    if not root.is_dir():
        return None
    if info.downsampled and _downsampled_files(root):
        return "downsampled", root
    if info.torchvision and root.name == _torchvision_folder(info):
        root = root.parent            # the user pointed at cifar-10-batches-py/ itself
    if info.torchvision and (root / _torchvision_folder(info)).exists():
        return "torchvision", root
    tree = _image_tree(root)
    return ("tree", tree) if tree is not None else None


def _image_tree(root: Path) -> Path | None:
    """`root`, or its only sub-folder (an archive's top-level folder), if it holds train/."""
    if (root / "train").is_dir():
        return root
    subdirs = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith((".", "__"))]
    if len(subdirs) == 1 and (subdirs[0] / "train").is_dir():
        return subdirs[0]
    return None


def _not_found(info: DatasetInfo, root: Path, tree_only: bool = False) -> DatasetError:
    if not root.exists():
        found = "the path does not exist"
    elif root.is_dir() and not any(root.iterdir()):
        found = "the folder is empty"
    else:
        found = f"found {_listing(root)}"
    tree = "an ImageFolder tree train/<class>/… + test/<class>/… (or val/<class>/…), or an archive " \
           "(.tar.gz, .tgz, .tar, .zip) of one"
    if info.downsampled and not tree_only:
        tree = (f"{DOWNSAMPLED_LAYOUT}, or an ImageFolder tree train/<class>/… + test/<class>/…, or an "
                f"archive (.tar.gz, .tgz, .tar, .zip) of either")
    if info.torchvision and not tree_only:
        return DatasetError(
            f"no {info.title} found at {root} ({found}): expected torchvision's "
            f"{_torchvision_layout(info)} or {tree}; set data.download: true to fetch it with "
            f"torchvision, or point data.root at an ImageFolder tree or archive")
    return DatasetError(f"no {info.title} found at {root} ({found}): expected {tree}; point "
                        f"data.root at one" + ("" if info.torchvision else
                                               f" ({info.title} cannot be downloaded automatically)"))


def _listing(folder: Path, limit: int = 6) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    more = f", … ({len(names)} entries)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more if names else "nothing"


# ------------------------------------------------------------------------------------------------
# Archives

def extract_archive(archive: str | Path, cache_dir: str | Path) -> Path:
    """Extract a .tar(.gz)/.tgz/.zip archive into `cache_dir`/<name>/ once and return that folder.

    A marker written after the last file records which archive (path, size, mtime) was extracted:
    an interrupted extraction, or a changed archive, is redone from scratch. Only regular files and
    folders are written, by nascore itself; absolute paths, `..` and links are refused, so nothing
    can land outside the folder. Processes sharing a cache (parallel runs) extract one at a time:
    the others wait for it and find the files there.
    """
    archive = Path(archive)
    st = archive.stat()
    stamp = {"archive": str(archive.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    name = archive.name
    for suffix in (".tar.gz", ".tgz", ".tar", ".zip"):
        name = name.removesuffix(suffix)
    dest = Path(cache_dir) / name
    marker = dest / _MARKER

    def extracted() -> bool:
        return marker.is_file() and json.loads(marker.read_text()) == stamp
    if extracted():
        return dest
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    # without the lock a second process would delete the first one's half-written folder
    with open(Path(cache_dir) / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if extracted():                   # another process did it while this one waited
            return dest
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        try:
            if zipfile.is_zipfile(archive):
                _extract_zip(archive, dest)
            else:
                _extract_tar(archive, dest)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
            raise DatasetError(f"cannot extract {archive} ({type(e).__name__}: {e}); the archive is "
                               f"damaged or truncated: fetch it again") from None
        write_json(marker, stamp)
    return dest


def _member_target(dest: Path, name: str, archive: Path) -> Path:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise DatasetError(f"{archive} holds the unsafe path {name!r} (absolute or with ..); "
                           f"refusing to extract it")
    return dest.joinpath(*path.parts)


def _extract_tar(archive: Path, dest: Path) -> None:
    # One sequential pass over the stream ("r|*"): random access into a .tar.gz re-inflates from the
    # start, and extractall() took minutes where this takes seconds on CIFAR-10's 60k files. Only
    # a member's path and bytes are used, never its mode, owner or link target: what tarfile's
    # filter="data" guards against cannot happen (its per-member checks also cost ~15% here).
    made: set[Path] = set()
    with tarfile.open(archive, mode="r|*") as tar:
        for member in tar:
            target = _member_target(dest, member.name, archive)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            if not member.isfile():
                raise DatasetError(f"{archive} holds {member.name!r}, a link or special file; "
                                   f"refusing to extract it")
            if target.parent not in made:
                target.parent.mkdir(parents=True, exist_ok=True)
                made.add(target.parent)
            src = tar.extractfile(member)
            assert src is not None        # a regular file always has a stream
            with src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)


def _extract_zip(archive: Path, dest: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        for member in zf.infolist():
            target = _member_target(dest, member.filename, archive)
            if stat.S_ISLNK(member.external_attr >> 16):
                raise DatasetError(f"{archive} holds {member.filename!r}, a link; refusing to "
                                   f"extract it")
            if member.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)


# ------------------------------------------------------------------------------------------------
# torchvision's own formats. torchvision downloads them (verifying md5s); nascore reads the files
# itself, checking structure instead of md5s: the same code then reads the real files and the small
# copies the tests write, and CIFAR's pickles load with an unpickler that builds arrays only.

def _torchvision_class(info: DatasetInfo) -> Any:
    import torchvision.datasets

    return getattr(torchvision.datasets, info.torchvision or "")


def _torchvision_folder(info: DatasetInfo) -> str:
    """What torchvision puts in the root: CIFAR's folder, SVHN's train .mat file."""
    cls = _torchvision_class(info)
    return cls.base_folder if hasattr(cls, "base_folder") else cls.split_list["train"][1]


def _torchvision_layout(info: DatasetInfo) -> str:
    cls = _torchvision_class(info)
    if hasattr(cls, "base_folder"):
        return f"{cls.base_folder}/"
    return f"{cls.split_list['train'][1]} + {cls.split_list['test'][1]}"


def _download(info: DatasetInfo, root: Path, train: bool) -> None:
    if info.torchvision is None:
        raise _not_found(info, root)
    cls = _torchvision_class(info)
    split = {"split": "train" if train else "test"} if info.torchvision == "SVHN" else {"train": train}
    try:
        cls(str(root), download=True, **split)
    except Exception as e:    # URLError, HTTPError, md5 mismatch (RuntimeError), disk full, ...
        raise DatasetError(f"downloading {info.title} into {root} failed ({type(e).__name__}: {e}); "
                           f"check the network, or point data.root at a local copy") from None


def _read_torchvision(info: DatasetInfo, root: Path,
                      train: bool) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    cls = _torchvision_class(info)
    if info.torchvision == "SVHN":
        return _read_svhn(root / cls.split_list["train" if train else "test"][1])
    folder = root / cls.base_folder
    names = [name for name, _md5 in (cls.train_list if train else cls.test_list)]
    missing = [n for n in [*names, cls.meta["filename"]] if not (folder / n).is_file()]
    if missing:
        raise DatasetError(f"incomplete {info.title} at {folder}: missing {', '.join(missing)}; "
                           f"delete the folder and rerun with data.download: true")
    images, labels = [], []
    for name in names:
        batch = _unpickle(folder / name)
        data, batch_labels = batch.get("data"), batch.get("labels", batch.get("fine_labels"))
        size = info.image_size
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
                and data.shape[1] == 3 * size * size and batch_labels is not None
                and len(batch_labels) == len(data)):
            raise DatasetError(f"{folder / name} is not a {info.title} batch (expected uint8 data "
                               f"(N, {3 * size * size}) and N labels); delete {folder} and "
                               f"rerun with data.download: true")
        images.append(torch.from_numpy(data.reshape(-1, 3, size, size)))
        labels.append(torch.as_tensor(batch_labels, dtype=torch.int64))
    classes = tuple(_unpickle(folder / cls.meta["filename"])[cls.meta["key"]])
    return torch.cat(images), torch.cat(labels), classes


def _read_svhn(path: Path) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    import scipy.io    # only SVHN needs scipy

    if not path.is_file():
        raise DatasetError(f"missing {path}; rerun with data.download: true")
    try:
        mat = scipy.io.loadmat(str(path))
        images, labels = mat["X"], mat["y"]
    except Exception as e:    # truncated or not a .mat file: scipy raises various errors
        raise DatasetError(f"cannot read {path} ({type(e).__name__}: {e}); delete it and rerun "
                           f"with data.download: true") from None
    if images.dtype != np.uint8 or images.shape[:3] != (32, 32, 3) or labels.size != images.shape[3]:
        raise DatasetError(f"{path} is not an SVHN .mat file (expected X uint8 (32, 32, 3, N), y (N, 1))")
    labels = labels.astype(np.int64).reshape(-1)
    labels[labels == 10] = 0           # SVHN labels the digit 0 as class 10 (torchvision does the same)
    # MATLAB order (H, W, C, N) -> (N, C, H, W)
    return (torch.from_numpy(np.ascontiguousarray(images.transpose(3, 2, 0, 1))),
            torch.from_numpy(labels), tuple(str(d) for d in range(10)))


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings and numpy arrays; any other global is refused, so a
    tampered file cannot run code."""

    # The function numpy pickles arrays with, under its numpy-1 and numpy-2 module names.
    _reconstruct = np.ndarray.__reduce__(np.empty(0))[0]
    _allowed = {("numpy.core.multiarray", "_reconstruct"): _reconstruct,
                ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
                ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):    # how Python 3 pickles bytes at protocol 2
            import codecs
            return codecs.encode
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def _unpickle(path: Path, fix: str = "delete its folder and rerun with data.download: true") -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = _ArrayUnpickler(f, encoding="latin1").load()   # the files are Python 2 pickles
    except Exception as e:    # truncated, corrupted, or a pickle that is more than arrays
        raise DatasetError(f"cannot read {path} ({type(e).__name__}: {e}); {fix}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path} does not hold a dict of arrays, as a dataset batch file does; {fix}")
    return data


# ------------------------------------------------------------------------------------------------
# Downsampled ImageNet (Chrabaszcz et al. 2017), the release NB201 cuts ImageNet16-120 from: ten
# pickled training batches and one validation file, each {'data': uint8 (N, 3·S·S), channel-planar
# like CIFAR, 'labels': ImageNet class ids 1..1000}. ImageNet16-120 keeps classes 1..120, as the
# benchmark does. There is no download: the files sit behind an image-net.org login.

DOWNSAMPLED_FILES = {True: tuple(f"train_data_batch_{i}" for i in range(1, 11)), False: ("val_data",)}
DOWNSAMPLED_LAYOUT = ("Downsampled ImageNet's batch files train_data_batch_1 … train_data_batch_10 + "
                      "val_data (image-net.org's Imagenet16_train.zip and Imagenet16_val.zip, "
                      "unzipped into one folder)")
_DOWNSAMPLED_FIX = "fetch the file again from image-net.org (Imagenet16_train.zip / Imagenet16_val.zip)"


def _downsampled_files(root: Path) -> dict[str, list[Path]]:
    """Where each batch file is, in `root` or up to two folders below it (the release's zips
    unpack into Imagenet16_train/ and Imagenet16_val/, an archive may add a top-level folder)."""
    wanted = {*DOWNSAMPLED_FILES[True], *DOWNSAMPLED_FILES[False]}
    found: dict[str, list[Path]] = {}
    level = [root]
    for _depth in range(3):
        below = []
        for folder in level:
            for entry in sorted(folder.iterdir()):
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    below.append(entry)
                elif entry.name in wanted:
                    found.setdefault(entry.name, []).append(entry)
        level = below
    return found


def _read_downsampled(info: DatasetInfo, root: Path,
                      train: bool) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    found = _downsampled_files(root)
    names = DOWNSAMPLED_FILES[train]
    missing = [n for n in names if n not in found]
    if missing:
        raise DatasetError(f"incomplete {info.title} at {root}: missing {', '.join(missing)}; "
                           f"expected {DOWNSAMPLED_LAYOUT}")
    for name in names:
        if len(found[name]) > 1:
            raise DatasetError(f"{root} holds {name} more than once ({', '.join(map(str, found[name]))}); "
                               f"keep one copy")
    size = info.image_size
    images, labels = [], []
    for name in names:
        path = found[name][0]
        batch = _unpickle(path, _DOWNSAMPLED_FIX)
        data, ids = batch.get("data"), batch.get("labels")
        try:
            ids = np.asarray(ids, dtype=np.int64)
        except (TypeError, ValueError):
            ids = None
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
                and data.shape[1] == 3 * size * size and ids is not None and ids.shape == data.shape[:1]):
            raise DatasetError(f"{path} is not a {size}×{size} Downsampled ImageNet batch (expected uint8 "
                               f"data (N, {3 * size * size}) and N labels); {_DOWNSAMPLED_FIX}")
        if len(ids) and not 1 <= ids.min() <= ids.max() <= 1000:
            raise DatasetError(f"{path} has labels outside ImageNet's 1..1000 (found {ids.min()}..{ids.max()}); "
                               f"{_DOWNSAMPLED_FIX}")
        keep = ids <= info.num_classes
        images.append(torch.from_numpy(np.ascontiguousarray(data[keep]).reshape(-1, 3, size, size)))
        labels.append(torch.from_numpy(ids[keep] - 1))
    label = torch.cat(labels)
    if not len(label):
        raise DatasetError(f"{root}: the {'training' if train else 'validation'} batches hold no image of "
                           f"classes 1..{info.num_classes}, the ones {info.title} keeps")
    # class names: the release's 1-based ImageNet class ids (its map_clsloc.txt order)
    return torch.cat(images), label, tuple(str(k) for k in range(1, info.num_classes + 1))


# ------------------------------------------------------------------------------------------------
# ImageFolder trees

def _split_folder(info: DatasetInfo, tree: Path, train: bool) -> tuple[Path, tuple[str, ...]]:
    """The split's folder and the class list (sorted train/ sub-folders: ImageFolder's order)."""
    classes = tuple(sorted(d.name for d in (tree / "train").iterdir()
                           if d.is_dir() and not d.name.startswith(".")))
    if len(classes) != info.num_classes:
        raise DatasetError(f"{tree / 'train'} has {len(classes)} class folders, {info.title} has "
                           f"{info.num_classes}; is data.root the right dataset?")
    if train:
        return tree / "train", classes
    split_dir = next((tree / s for s in ("test", "val") if (tree / s).is_dir()), None)
    if split_dir is None:
        raise DatasetError(f"{tree} has train/ but no test/ or val/ folder with the held-out images")
    held_out = tuple(sorted(d.name for d in split_dir.iterdir()
                            if d.is_dir() and not d.name.startswith(".")))
    if held_out != classes:
        raise DatasetError(f"{split_dir} has class folders {_short(held_out)}, train/ has "
                           f"{_short(classes)}; both splits need the same classes")
    return split_dir, classes


def _short(names: Sequence[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f", … ({len(names)})" if len(names) > limit else "")


def _tree_samples(split_dir: Path, classes: Sequence[str]) -> list[tuple[str, int]]:
    """(path, label) pairs in torchvision ImageFolder's order; hidden files (._x.jpg) skipped."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    def is_image(path: str) -> bool:
        return path.lower().endswith(IMG_EXTENSIONS) and not os.path.basename(path).startswith(".")

    try:
        return make_dataset(str(split_dir), {c: i for i, c in enumerate(classes)},
                            is_valid_file=is_image)
    except FileNotFoundError as e:    # a class folder without images
        raise DatasetError(f"{split_dir}: {e}") from None


def _read_image_tree(info: DatasetInfo, tree: Path, train: bool,
                     workers: int | None) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    split_dir, classes = _split_folder(info, tree, train)
    samples = _tree_samples(split_dir, classes)
    paths = [p for p, _ in samples]
    chunks = [paths[i:i + _CHUNK] for i in range(0, len(paths), _CHUNK)]
    decode = partial(_decode_files, size=info.image_size, title=info.title)
    workers = workers or _cpus()
    # Pillow decodes (ImageFolder's own decoder). Small images are bound by Python overhead, so
    # threads do not help (measured: slower than one); forked processes do, like DataLoader workers.
    if workers > 1 and len(chunks) > 1 and "fork" in mp.get_all_start_methods():
        with ProcessPoolExecutor(min(workers, len(chunks)), mp_context=mp.get_context("fork")) as pool:
            arrays = list(pool.map(decode, chunks))
    else:
        arrays = [decode(chunk) for chunk in chunks]
    images = torch.from_numpy(np.concatenate(arrays)) if arrays else \
        torch.empty(0, 3, info.image_size, info.image_size, dtype=torch.uint8)
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return images, labels, classes


_CHUNK = 1000    # files per decoding task: large enough that process start-up and transfer amortise


def _cpus() -> int:
    """Cores this process may run on (a container or taskset may allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _decode_files(paths: Sequence[str], size: int, title: str) -> np.ndarray:
    """Decode image files to uint8 (N, 3, size, size), refusing any other size."""
    from PIL import Image, UnidentifiedImageError

    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as im:
                if im.size != (size, size):
                    raise DatasetError(f"{path} is {im.size[0]}×{im.size[1]} pixels; {title} images "
                                       f"must be {size}×{size} (resize the tree, or use the dataset "
                                       f"it belongs to)")
                out[i] = np.asarray(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise DatasetError(f"cannot decode {path} ({e}); remove or replace the file") from None
    return out.transpose(0, 3, 1, 2)


# ------------------------------------------------------------------------------------------------
# Synthetic data for smoke runs

def synthetic_dataset(num_classes: int = 10, n_train: int = 2048, n_test: int = 512,
                      image_size: int = 32, seed: int = 0) -> tuple[ImageArrays, ImageArrays]:
    """A learnable stand-in for CIFAR: (train, test) uint8 arrays, a pure function of the arguments.

    Each class is a fixed smooth random colour pattern (a 4×4 grid of colours, upsampled); each
    image is its class pattern shifted by up to 2 px, plus pixel noise. A small CNN separates the
    classes within tens of steps, so a smoke run shows a falling loss.
    """
    g = torch.Generator().manual_seed(seed)
    grid = torch.rand(num_classes, 3, 4, 4, generator=g)
    patterns = F.interpolate(grid, size=(image_size, image_size), mode="bilinear",
                             align_corners=False)

    info = dataset_info("synthetic")
    classes = tuple(f"class_{i}" for i in range(num_classes))

    def split(n: int) -> ImageArrays:
        labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
        shifts = torch.randint(0, 5, (n, 2), generator=g)
        noise = 0.1 * torch.randn(n, 3, image_size, image_size, generator=g)
        x = aug.crop(patterns[labels], 2, shifts) + noise
        images = (x.clamp(0, 1) * 255).round().to(torch.uint8).contiguous()
        return ImageArrays(info.name, images, labels, classes, info.mean, info.std)

    return split(n_train), split(n_test)


# ------------------------------------------------------------------------------------------------
# Prepared arrays: what the prepare stage writes and every later stage reads

PREPARED_FORMAT = 1
_META = "meta.json"


def save_prepared(directory: str | Path, splits: dict[str, ImageArrays]) -> None:
    """Write each split as <split>_images.npy + <split>_labels.npy, then meta.json (last, so a
    folder with meta.json is complete)."""
    directory = Path(directory)
    first = next(iter(splits.values()))
    for split, arrays in splits.items():
        if (arrays.name, arrays.classes) != (first.name, first.classes):
            raise DatasetError(f"split {split!r} is from another dataset or class list")
        for kind, tensor in (("images", arrays.images), ("labels", arrays.labels)):
            with atomic_path(directory / f"{split}_{kind}.npy") as tmp, open(tmp, "wb") as f:
                np.save(f, tensor.numpy(), allow_pickle=False)
    write_json(directory / _META, {
        "format": PREPARED_FORMAT, "dataset": first.name, "classes": list(first.classes),
        "mean": list(first.mean), "std": list(first.std),
        "splits": {s: list(a.images.shape) for s, a in splits.items()}})


def load_prepared(directory: str | Path, split: str) -> ImageArrays:
    """Read one split written by `save_prepared`, checking every file against meta.json."""
    directory = Path(directory)
    rerun = "rerun the prepare stage (dvc repro prepare)"
    try:
        meta = json.loads((directory / _META).read_text())
        shape = tuple(meta["splits"][split]) if split in meta["splits"] else None
        dataset, classes = meta["dataset"], tuple(meta["classes"])
        mean, std = tuple(meta["mean"]), tuple(meta["std"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"{directory / _META} is missing or unreadable ({type(e).__name__}); "
                           f"{rerun}") from None
    if meta.get("format") != PREPARED_FORMAT:
        raise DatasetError(f"{directory} holds prepared data format {meta.get('format')}, this nascore "
                           f"reads format {PREPARED_FORMAT}; {rerun}")
    if shape is None:
        raise DatasetError(f"{directory} has no {split!r} split (it has {', '.join(meta['splits'])}); "
                           f"{rerun}")
    arrays = {}
    for kind, dtype, want in (("images", np.uint8, shape), ("labels", np.int64, shape[:1])):
        path = directory / f"{split}_{kind}.npy"
        try:
            arrays[kind] = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:     # missing, truncated, or not .npy
            raise DatasetError(f"{path} is missing or damaged ({type(e).__name__}); {rerun}") from None
        if arrays[kind].dtype != dtype or arrays[kind].shape != tuple(want):
            raise DatasetError(f"{path} holds {arrays[kind].dtype} {arrays[kind].shape}, meta.json "
                               f"says {np.dtype(dtype)} {tuple(want)}; {rerun}")
    return ImageArrays(dataset, torch.from_numpy(arrays["images"]), torch.from_numpy(arrays["labels"]),
                       classes, mean, std)


# ------------------------------------------------------------------------------------------------
# The DARTS search split

SPLIT_RULES = ("first_half", "random", "test_half")


@dataclass(frozen=True)
class SearchSplit:
    """Disjoint index sets: `weights` (into the training set) feeds w steps, `arch` feeds α steps,
    into the training set, or into the test set when `arch_from` is "test"."""

    weights: torch.Tensor
    arch: torch.Tensor
    num_samples: int                   # training images
    seed: int
    rule: str = "random"
    arch_from: str = "train"           # train | test
    num_test: int | None = None        # test images (set when arch_from is "test")


def split_rule(rule: str, space: str, dataset: str) -> str:
    """`data.split: auto` as methods.md says per space: NB201 (§1.3) takes a fixed random half of
    the training set for α on CIFAR-10, a fixed half of the test set on CIFAR-100 and
    ImageNet16-120; the DARTS-family spaces (§2.1) split the training set in order, first half for
    w, second for α."""
    if rule != "auto":
        return rule
    if space == "nb201":
        return "test_half" if dataset in ("cifar100", "imagenet16_120") else "random"
    return "first_half"


def search_split(num_samples: int, *, fraction: float = 0.5, seed: int = 0, rule: str = "random",
                 num_test: int | None = None) -> SearchSplit:
    """The search's two index sets under `rule` (one of SPLIT_RULES):
    - first_half: the first floor(fraction·N) training images for w, the rest for α (DARTS);
    - random: a seeded random floor(fraction·N) for w, the rest for α (NB201 on CIFAR-10);
    - test_half: every training image for w, a seeded random half of the `num_test` test
      images for α (NB201 on CIFAR-100 and ImageNet16-120; `fraction` does not apply).
    """
    if rule not in SPLIT_RULES:
        raise ValueError(f"unknown split rule {rule!r}; allowed: {', '.join(SPLIT_RULES)}")
    if rule == "test_half":
        if not num_test or num_test < 2:
            raise ValueError(f"split rule test_half needs a test set of >= 2 images, got {num_test}")
        order = torch.randperm(num_test, generator=_generator(seed, 0, _SPLIT))
        return SearchSplit(torch.arange(num_samples), order[:num_test // 2].sort().values, num_samples, seed,
                           rule, "test", num_test)
    if not 0 < fraction < 1:
        raise ValueError(f"split fraction must be in (0, 1), got {fraction}")
    cut = int(math.floor(fraction * num_samples))
    if rule == "first_half":
        return SearchSplit(torch.arange(cut), torch.arange(cut, num_samples), num_samples, seed, rule)
    order = torch.randperm(num_samples, generator=_generator(seed, 0, _SPLIT))
    return SearchSplit(order[:cut].sort().values, order[cut:].sort().values, num_samples, seed, rule)


def save_split(path: str | Path, split: SearchSplit) -> None:
    write_json(path, {"num_samples": split.num_samples, "seed": split.seed, "rule": split.rule,
                      "arch_from": split.arch_from, "num_test": split.num_test,
                      "weights": split.weights, "arch": split.arch})


def load_split(path: str | Path, num_samples: int, num_test: int | None = None) -> SearchSplit:
    """Read a split and check it still fits the dataset (same sizes, disjoint, in range)."""
    try:
        data = json.loads(Path(path).read_text())
        split = SearchSplit(torch.tensor(data["weights"], dtype=torch.int64),
                            torch.tensor(data["arch"], dtype=torch.int64),
                            int(data["num_samples"]), int(data["seed"]),
                            # files written before the rules existed hold a random training-set split
                            str(data.get("rule", "random")), str(data.get("arch_from", "train")),
                            None if data.get("num_test") is None else int(data["num_test"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"search split {path} is missing or unreadable ({type(e).__name__}); "
                           f"rerun the stage that writes it") from None
    if split.num_samples != num_samples:
        raise DatasetError(f"search split {path} was made for {split.num_samples} training images, "
                           f"the dataset has {num_samples}; delete it to make a new split")
    if split.arch_from not in ("train", "test"):
        raise DatasetError(f"search split {path}: arch_from={split.arch_from!r}, allowed: train, test; "
                           f"rerun the stage that writes it")
    if split.arch_from == "test" and split.num_test != num_test:
        raise DatasetError(f"search split {path} was made for {split.num_test} test images, the dataset "
                           f"has {num_test}; delete it to make a new split")
    halves = [(split.weights, num_samples), (split.arch, num_samples if split.arch_from == "train" else num_test)]
    if split.arch_from == "train":
        halves = [(torch.cat([split.weights, split.arch]), num_samples)]
    for both, n in halves:
        if len(both) and (both.min() < 0 or both.max() >= n or len(both.unique()) != len(both)):
            raise DatasetError(f"search split {path} has indices out of range or shared between halves; "
                               f"delete it to make a new split")
    return split


# ------------------------------------------------------------------------------------------------
# Seeds: every random stream is a pure function of (seed, epoch, stream)

_ORDER, _AUGMENT, _SAMPLE, _SPLIT = range(4)


def _seed_int(*words: int) -> int:
    # SeedSequence mixes the words so nearby (seed, epoch) pairs give unrelated streams; masking
    # maps negative values (search.py uses epochs -1, -2, ... for fixed orders) injectively.
    mixed = np.random.SeedSequence([w & 0xFFFF_FFFF_FFFF_FFFF for w in words])
    return int(mixed.generate_state(1, dtype=np.uint64)[0])


def _generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(_seed_int(seed, epoch, stream))


def epoch_order(num_samples: int, *, seed: int, epoch: int, shuffle: bool, rank: int = 0,
                world_size: int = 1, replacement: bool = False) -> torch.Tensor:
    """The sample indices `rank` visits in `epoch`, in order.

    Every rank draws the same permutation and takes every world_size-th entry from position
    `rank`. Shuffled (training) orders are first cut to a multiple of world_size so all ranks take
    the same number of steps (DDP would hang otherwise); unshuffled (evaluation) orders keep every
    sample, so shards may differ by one. `replacement`: num_samples uniform draws with replacement
    instead of a permutation (NB201 pairs each weight batch with random α samples, §1.3).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if replacement and not shuffle:
        raise ValueError("replacement draws a random order: it needs shuffle=True")
    if not shuffle:
        return torch.arange(rank, num_samples, world_size)
    g = _generator(seed, epoch, _ORDER)
    order = (torch.randint(num_samples, (num_samples,), generator=g) if replacement
             else torch.randperm(num_samples, generator=g))
    return order[rank:num_samples - num_samples % world_size:world_size]


# ------------------------------------------------------------------------------------------------
# Loaders

class Loader:
    """Batches (x, y) on the device; `set_epoch` picks the epoch to replay; `len` = this rank's
    batches per epoch.

    Iterating twice without `set_epoch` in between yields the same batches: the caller (the
    training loop) owns the epoch counter, so a resumed run continues with the right one.
    """

    epoch: int = 0
    batch_size: int
    drop_last: bool
    shuffle: bool
    rank: int
    world_size: int
    replacement: bool = False       # each pass: random draws with replacement (ResidentLoader only)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def forever(self, start_epoch: int | None = None) -> Iterator[Batch]:
        """An endless cycle, reshuffled each pass (the DARTS α loader); pass p is epoch start + p."""
        epoch = self.epoch if start_epoch is None else start_epoch
        if len(self) == 0:
            raise ValueError("the loader yields no batches; it cannot cycle")
        while True:
            self.set_epoch(epoch)
            yield from self
            epoch += 1

    def num_samples(self) -> int:
        """Samples in the whole (unsharded) dataset this loader serves."""
        raise NotImplementedError

    def __len__(self) -> int:
        n, ws = self.num_samples(), self.world_size
        shard = n // ws if self.shuffle else len(range(self.rank, n, ws))   # as in epoch_order
        return shard // self.batch_size if self.drop_last else math.ceil(shard / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        raise NotImplementedError


def _check_sizes(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")


class ResidentLoader(Loader):
    """Serves an in-memory uint8 dataset from the device, augmenting whole batches there.

    Training recipe (`augment=True`): random crop with `crop_padding` zero padding, horizontal flip,
    normalisation, then cutout of side `cutout` (0 = none). The draws for an epoch come from a CPU
    generator seeded by (seed, epoch), so CPU and GPU runs see identical batches.
    """

    def __init__(self, data: ImageArrays, *, batch_size: int,
                 indices: Sequence[int] | torch.Tensor | None = None, shuffle: bool = True,
                 drop_last: bool = False, augment: bool = True,
                 crop_padding: int = 4, cutout: int = 0, seed: int = 0,
                 device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1,
                 channels_last: bool = False) -> None:
        _check_sizes(batch_size, rank, world_size)
        if cutout and not augment:
            raise ValueError("cutout is part of the training augmentation: set augment=True or cutout=0")
        if crop_padding < 0 or cutout < 0:
            raise ValueError(f"crop_padding and cutout must be >= 0, got {crop_padding}, {cutout}")
        images, labels = data.images, data.labels
        if indices is not None:
            index = torch.as_tensor(indices, dtype=torch.int64)
            images, labels = images[index], labels[index]
        self.device = torch.device(device)
        self.labels = labels.to(self.device)
        self.mean = torch.tensor(data.mean, device=self.device)
        self.std = torch.tensor(data.std, device=self.device)
        self.recipe = (aug.BatchRecipe(*images.shape[-2:], crop_padding, cutout, self.mean, self.std, self.device,
                                       channels_last) if augment else None)
        # augmenting: the images padded once, to crop every batch from (`BatchRecipe`)
        self.images = self.recipe.pad_dataset(images.to(self.device)) if self.recipe else images.to(self.device)
        self.image_size = images.shape[-1]
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.augment, self.crop_padding, self.cutout = augment, crop_padding, cutout
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def num_samples(self) -> int:
        return len(self.labels)

    def __iter__(self) -> Iterator[Batch]:
        epoch, n = self.epoch, len(self.labels)
        order = epoch_order(n, seed=self.seed, epoch=epoch, shuffle=self.shuffle, rank=self.rank,
                            world_size=self.world_size, replacement=self.replacement).to(self.device)
        draws = None
        if self.recipe is not None:
            # drawn for every sample, indexed by sample: a sample's augmentation does not depend
            # on the rank or batch it lands in; with replacement, by position (a sample drawn
            # twice in a pass is augmented twice)
            draws = aug.BatchRecipe.pack(aug.draw_augmentation(n, self.image_size, self.crop_padding,
                                                               _generator(self.seed, epoch, _AUGMENT))).to(self.device)
            if not self.replacement:
                draws = draws[order]
        # the epoch's labels and draws in its order, once: each batch's are a slice, not a gather
        labels = self.labels[order]
        for b in range(len(self)):
            batch = slice(b * self.batch_size, (b + 1) * self.batch_size)
            index = order[batch]
            if draws is not None:
                x = self.recipe(self.images, index, draws[batch])
            else:
                x = aug.normalize(self.images[index], self.mean, self.std)
            yield x.contiguous(memory_format=self.memory_format), labels[batch]


class _SeededImages(Dataset):
    """ImageFolder samples whose transform randomness is seeded per (seed, epoch, sample).

    Keys are (index, epoch) pairs from the batch sampler, so the augmentation is reproducible
    whatever the worker count, and persistent workers need no epoch broadcast.
    """

    def __init__(self, samples: list[tuple[str, int]], transform: Any, seed: int) -> None:
        self.samples, self.transform, self.seed = samples, transform, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        from torchvision.datasets.folder import pil_loader

        index, epoch = key
        path, label = self.samples[index]
        image = pil_loader(path)
        # fork_rng: torchvision transforms draw from the global generator; seed it for this sample
        # only and restore it after, so the caller's stream (workers=0) is left untouched
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed_int(self.seed, epoch, _SAMPLE, index))
            return self.transform(image), label


class _EpochBatches:
    """Batch sampler: lists of (index, epoch) keys following `epoch_order` for its epoch.

    It holds its own copy of the settings rather than a reference to the loader: a cycle through
    the DataLoader would leave its persistent workers to be reaped by a timeout at exit.
    """

    def __init__(self, num_samples: int, batch_size: int, num_batches: int, seed: int,
                 shuffle: bool, rank: int, world_size: int) -> None:
        self.num_samples, self.batch_size, self.num_batches = num_samples, batch_size, num_batches
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.epoch = 0

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, bs = self.epoch, self.batch_size
        order = epoch_order(self.num_samples, seed=self.seed, epoch=epoch, shuffle=self.shuffle,
                            rank=self.rank, world_size=self.world_size).tolist()
        for b in range(self.num_batches):
            yield [(i, epoch) for i in order[b * bs:(b + 1) * bs]]


class FolderLoader(Loader):
    """Serves an ImageFolder split through DataLoader workers with the ImageNet recipe (§1.1).

    Train (`augment=True`): RandomResizedCrop(size), flip, ColorJitter(0.4, 0.4, 0.4, 0.2);
    eval: Resize(size·256/224), CenterCrop(size); then ToTensor + Normalize. Batches are moved to
    `device` (from pinned memory when it is a GPU). `workers` defaults to this rank's share of
    the cores.
    """

    def __init__(self, data: ImageFiles, *, batch_size: int,
                 indices: Sequence[int] | torch.Tensor | None = None, shuffle: bool = True,
                 drop_last: bool = False, augment: bool = True, seed: int = 0,
                 device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1,
                 channels_last: bool = False, workers: int | None = None) -> None:
        from torchvision import transforms as T

        _check_sizes(batch_size, rank, world_size)
        size = data.image_size
        if augment:
            steps = [T.RandomResizedCrop(size), T.RandomHorizontalFlip(),
                     T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.2)]
        else:
            steps = [T.Resize(round(size * 256 / 224)), T.CenterCrop(size)]
        transform = T.Compose([*steps, T.ToTensor(), T.Normalize(data.mean, data.std)])
        samples = _tree_samples(data.root, data.classes)
        if indices is not None:
            samples = [samples[i] for i in torch.as_tensor(indices, dtype=torch.int64).tolist()]
        self.dataset = _SeededImages(samples, transform, seed)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device = torch.device(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        workers = max(1, _cpus() // world_size) if workers is None else workers   # ranks share cores
        self._batches = _EpochBatches(len(samples), batch_size, len(self), seed, shuffle, rank,
                                      world_size)
        # its own generator: DataLoader would otherwise draw worker seeds from the global stream
        self._loader = DataLoader(self.dataset, batch_sampler=self._batches, num_workers=workers,
                                  pin_memory=self.device.type == "cuda",
                                  persistent_workers=workers > 0,
                                  generator=torch.Generator().manual_seed(seed))

    def num_samples(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self._batches.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        for x, y in self._loader:
            yield (x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format),
                   y.to(self.device, non_blocking=True))


def make_loader(source: ImageArrays | ImageFiles, *, batch_size: int, train: bool,
                indices: Sequence[int] | torch.Tensor | None = None, seed: int = 0, cutout: int = 0,
                crop_padding: int | None = None, drop_last: bool = False,
                device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1,
                channels_last: bool = False, workers: int | None = None) -> Loader:
    """The loader for `source`: training (shuffled, augmented) or evaluation (ordered, plain).

    In-memory arrays get a `ResidentLoader` (cutout and crop_padding apply; crop_padding None: the
    dataset's), image files a `FolderLoader` (workers apply).
    """
    common = dict(batch_size=batch_size, indices=indices, shuffle=train, drop_last=drop_last,
                  augment=train, seed=seed, device=device, rank=rank, world_size=world_size,
                  channels_last=channels_last)
    if isinstance(source, ImageArrays):
        pad = dataset_crop_padding(source) if crop_padding is None else crop_padding
        return ResidentLoader(source, crop_padding=pad, cutout=cutout if train else 0, **common)
    return FolderLoader(source, workers=workers, **common)
