"""MNIST, sequential MNIST and permuted sequential MNIST.

The four MNIST files are looked for, in order, in a directory given by the caller, in the
directory named by the environment variable ``ORGANICS_MNIST_DIR``, and in
``../shared/data/mnist`` beside the repository; if none holds them, torchvision downloads
them (where a network exists). Every file's SHA-256 (of its uncompressed content) is
verified before use. Images come as float32 in [0, 1].
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

from ._checks import check_choice, check_count, is_integer

__all__ = [
    "DataIntegrityError",
    "MNIST_SHA256",
    "MNISTSplits",
    "TASKS",
    "check_image_size",
    "check_task",
    "file_sha256",
    "find_mnist_dir",
    "input_size",
    "load_mnist",
    "pixel_permutation",
    "to_sequence",
    "batches",
]

MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
"""SHA-256 of the uncompressed MNIST files (as listed in ``shared/data/mnist``)."""

TASKS = ("static", "sequential", "permuted")
"""Flat images, pixel sequences, pixel sequences in a fixed random order."""

_REPO_SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


class DataIntegrityError(ValueError):
    """A data file is missing, unreadable or fails its checksum."""


def _cache_dir() -> Path:
    return Path(os.environ.get("ORGANICS_CACHE", Path.home() / ".cache" / "organics"))


def _holds_mnist(directory: Path) -> bool:
    return all((directory / name).exists() or (directory / f"{name}.gz").exists() for name in MNIST_SHA256)


def find_mnist_dir(root: str | os.PathLike | None = None) -> Path | None:
    """The directory holding the four MNIST files, or ``None`` if no known place has them.

    Parameters
    ----------
    root : path, optional
        A directory given by the user. If given it must hold the files (``.gz`` or
        uncompressed), otherwise :class:`DataIntegrityError` is raised.
    """
    if root is not None:
        root = Path(root)
        if not _holds_mnist(root):
            missing = [n for n in MNIST_SHA256 if not (root / n).exists() and not (root / f"{n}.gz").exists()]
            raise DataIntegrityError(f"MNIST directory {root} lacks {', '.join(missing)}")
        return root
    for candidate in (os.environ.get("ORGANICS_MNIST_DIR"), _REPO_SHARED):
        if candidate and _holds_mnist(Path(candidate)):
            return Path(candidate)
    return None


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, as hexadecimal (read in blocks of 1 MiB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _stage_raw_files(source: Path, raw: Path) -> None:
    """Copy (gunzip) the MNIST files from ``source`` into torchvision's ``raw`` folder, verified.

    Each file is written to a temporary name of this process's own and renamed into place
    only once verified, so processes staging into the same cache at once (two training runs
    started together) neither read a half-written file nor delete each other's.
    """
    raw.mkdir(parents=True, exist_ok=True)
    for name, expected in MNIST_SHA256.items():
        target = raw / name
        if target.exists() and file_sha256(target) == expected:
            continue
        plain, packed = source / name, source / f"{name}.gz"
        fd, tmp_name = tempfile.mkstemp(prefix=f"{name}.", suffix=".part", dir=raw)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            if plain.exists():
                shutil.copyfile(plain, tmp)
            else:
                with gzip.open(packed, "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as err:  # zlib: damage inside the stream
            tmp.unlink(missing_ok=True)
            raise DataIntegrityError(
                f"cannot read MNIST file {packed if not plain.exists() else plain}: {err}"
            ) from err
        if file_sha256(tmp) != expected:
            tmp.unlink()
            raise DataIntegrityError(
                f"MNIST file {name} in {source} fails its SHA-256 check (corrupt or not the original)"
            )
        tmp.replace(target)


def _verify_raw(raw: Path) -> None:
    for name, expected in MNIST_SHA256.items():
        if file_sha256(raw / name) != expected:
            raise DataIntegrityError(f"downloaded MNIST file {raw / name} fails its SHA-256 check")


def _mnist_tensors(root: str | os.PathLike | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    cache = _cache_dir() / "mnist"
    # torchvision prefers a legacy processed/ folder to the raw files and checks nothing in it
    shutil.rmtree(cache / "MNIST" / "processed", ignore_errors=True)
    source = find_mnist_dir(root)
    if source is not None:
        _stage_raw_files(source, cache / "MNIST" / "raw")
        download = False
    else:
        download = True
    try:
        train = torchvision.datasets.MNIST(cache, train=True, download=download)
        test = torchvision.datasets.MNIST(cache, train=False, download=download)
    except (RuntimeError, OSError) as err:
        raise DataIntegrityError(
            f"MNIST not found, or its files in the cache {cache} are unreadable: pass root=... (--data-root), "
            f"set ORGANICS_MNIST_DIR, or allow torchvision to download it ({err})"
        ) from err
    if download:
        _verify_raw(cache / "MNIST" / "raw")
    return train.data, train.targets, test.data, test.targets


@dataclass(frozen=True)
class MNISTSplits:
    """Train / validation / test tensors.

    ``x_*`` are float32 in [0, 1], of shape (N, 784) for static tasks or (N, T, 1) for
    sequential ones; ``y_*`` are int64 labels.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def to(self, device: torch.device | str) -> MNISTSplits:
        """The same splits on ``device``."""
        return MNISTSplits(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def pixel_permutation(length: int = 784, seed: int = 0) -> torch.Tensor:
    """The fixed random pixel order of permuted sequential MNIST (seeded)."""
    return torch.randperm(length, generator=torch.Generator().manual_seed(seed))


def check_image_size(image_size: int) -> None:
    """Raise ``ValueError`` unless ``image_size`` divides 28 (pooled images must tile the 28 x 28 image)."""
    if not (is_integer(image_size) and 1 <= image_size <= 28 and 28 % image_size == 0):
        raise ValueError(f"image_size must divide 28 (1, 2, 4, 7, 14 or 28), got {image_size}")


def input_size(task: str, image_size: int = 28) -> int:
    """Size of one input of a task: ``image_size**2`` pixels (static) or one pixel per step (sequential)."""
    check_task(task)
    check_image_size(image_size)
    return image_size**2 if task == "static" else 1


def check_task(task: str) -> None:
    """Raise ``ValueError`` unless ``task`` is one of :data:`TASKS`."""
    check_choice("task", task, TASKS)


def to_sequence(images: torch.Tensor, *, image_size: int = 28, permutation: torch.Tensor | None = None) -> torch.Tensor:
    """Images (N, 784) as pixel sequences (N, T, 1), T = ``image_size**2``, scan-line order.

    ``image_size < 28`` average-pools the images first (for quick runs); ``permutation``
    reorders the T pixels.
    """
    check_image_size(image_size)
    if image_size != 28:
        images = F.avg_pool2d(images.view(-1, 1, 28, 28), 28 // image_size).flatten(1)
    seq = images.view(images.shape[0], -1, 1)
    if permutation is not None:
        if permutation.shape != (seq.shape[1],):
            raise ValueError(f"permutation must have shape ({seq.shape[1]},), got {tuple(permutation.shape)}")
        if not torch.equal(torch.sort(permutation).values.cpu(), torch.arange(seq.shape[1])):
            raise ValueError(f"permutation must hold each of 0..{seq.shape[1] - 1} once")
        seq = seq[:, permutation]
    return seq


def load_mnist(
    root: str | os.PathLike | None = None,
    *,
    task: str = "static",
    n_val: int = 3000,
    split_seed: int = 0,
    permutation_seed: int = 0,
    image_size: int = 28,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> MNISTSplits:
    """Load MNIST for one of the paper's tasks.

    Parameters
    ----------
    root : path, optional
        Directory holding the four MNIST files (see :func:`find_mnist_dir`).
    task : {"static", "sequential", "permuted"}
        Flat images (N, 784), pixel sequences (N, 784, 1), or pixel sequences in one
        fixed random order (seeded by ``permutation_seed``).
    n_val : int
        Validation images held out of the 60,000 training images (the paper: 3,000,
        leaving 57,000), chosen by a permutation seeded with ``split_seed``.
    image_size : int
        Side of the (average-pooled) image, a divisor of 28; < 28 only for quick runs.
    limit_train, limit_test : int, optional
        Keep only this many training (and proportionally validation) / test images, for
        quick runs.
    """
    check_task(task)
    check_image_size(image_size)
    check_count("n_val", n_val, 1, 59_999)
    check_count("limit_train", limit_train, optional=True)
    check_count("limit_test", limit_test, optional=True)
    x_tr, y_tr, x_te, y_te = _mnist_tensors(root)
    x_tr = x_tr.reshape(-1, 784).float() / 255.0
    x_te = x_te.reshape(-1, 784).float() / 255.0
    order = torch.randperm(60000, generator=torch.Generator().manual_seed(split_seed))
    val_idx, train_idx = order[:n_val], order[n_val:]
    if limit_train is not None:
        val_idx = val_idx[: max(1, limit_train * n_val // len(train_idx))]
        train_idx = train_idx[:limit_train]
    if limit_test is not None:
        x_te, y_te = x_te[:limit_test], y_te[:limit_test]
    xs = [x_tr[train_idx], x_tr[val_idx], x_te]
    if task != "static":
        perm = pixel_permutation(image_size**2, permutation_seed) if task == "permuted" else None
        xs = [to_sequence(x, image_size=image_size, permutation=perm) for x in xs]
    elif image_size != 28:
        xs = [F.avg_pool2d(x.view(-1, 1, 28, 28), 28 // image_size).flatten(1) for x in xs]
    return MNISTSplits(xs[0], y_tr[train_idx], xs[1], y_tr[val_idx], xs[2], y_te)


def batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
):
    """Iterate over ``(x, y)`` mini-batches of in-memory tensors (the last one may be smaller)."""
    check_count("batch_size", batch_size)
    order = torch.randperm(len(x), generator=generator) if shuffle else torch.arange(len(x))
    order = order.to(x.device)  # once: a copy from the host per batch would wait for the device each time
    for start in range(0, len(x), batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]
