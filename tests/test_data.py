"""MNIST loading: checksums, splits, sequences."""

import gzip
import multiprocessing
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from organics.data import (
    MNIST_SHA256,
    DataIntegrityError,
    _stage_raw_files,
    batches,
    find_mnist_dir,
    input_size,
    load_mnist,
    pixel_permutation,
    to_sequence,
)

pytestmark = pytest.mark.skipif(find_mnist_dir() is None, reason="no local MNIST copy")


@pytest.fixture
def mnist_copy(tmp_path, monkeypatch):
    """A private copy of the MNIST files and an empty cache."""
    monkeypatch.setenv("ORGANICS_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "mnist"
    shutil.copytree(find_mnist_dir(), copy)
    return copy


def test_paper_split_sizes_and_ranges():
    d = load_mnist()
    assert d.x_train.shape == (57000, 784) and d.x_val.shape == (3000, 784) and d.x_test.shape == (10000, 784)
    assert d.x_train.dtype == torch.float32 and 0 <= d.x_train.min() and d.x_train.max() <= 1
    assert set(d.y_test.tolist()) == set(range(10))
    again = load_mnist()
    assert torch.equal(d.y_val, again.y_val)


def test_sequential_and_permuted_tasks():
    seq = load_mnist(task="sequential", limit_train=100, limit_test=50)
    perm = load_mnist(task="permuted", limit_train=100, limit_test=50, permutation_seed=3)
    assert seq.x_train.shape == (100, 784, 1) and seq.x_test.shape == (50, 784, 1)
    p = pixel_permutation(784, 3)
    assert torch.equal(perm.x_test[:, :, 0], seq.x_test[:, p, 0])
    assert torch.equal(p, pixel_permutation(784, 3)) and not torch.equal(p, pixel_permutation(784, 4))


def test_downsampled_sequences_for_quick_runs():
    d = load_mnist(task="sequential", image_size=7, limit_train=10, limit_test=10)
    assert d.x_train.shape == (10, 49, 1)
    img = torch.arange(784.0).view(1, 784)
    assert to_sequence(img, image_size=14)[0, 0, 0] == pytest.approx((0 + 1 + 28 + 29) / 4)


def test_corrupt_file_raises(mnist_copy):
    target = mnist_copy / "t10k-labels-idx1-ubyte.gz"
    with gzip.open(target, "rb") as fh:
        data = bytearray(fh.read())
    data[100] ^= 0xFF
    with gzip.open(target, "wb") as fh:
        fh.write(bytes(data))
    with pytest.raises(DataIntegrityError, match="t10k-labels-idx1-ubyte.*SHA-256"):
        load_mnist(mnist_copy)


def test_truncated_archive_raises(mnist_copy):
    target = mnist_copy / "train-labels-idx1-ubyte.gz"
    target.write_bytes(target.read_bytes()[:500])
    with pytest.raises(DataIntegrityError, match="cannot read"):
        load_mnist(mnist_copy)


@pytest.mark.parametrize("offset", [200, 1000, 3000])
def test_damage_inside_a_compressed_stream_raises_and_leaves_no_partial_file(mnist_copy, offset):
    """A byte flipped in the gzip stream itself: zlib's error or the CRC's, both as DataIntegrityError."""
    target = mnist_copy / "t10k-labels-idx1-ubyte.gz"
    damaged = bytearray(target.read_bytes())
    damaged[offset] ^= 0xFF
    target.write_bytes(bytes(damaged))
    with pytest.raises(DataIntegrityError, match="cannot read MNIST file .*t10k-labels-idx1-ubyte.gz"):
        load_mnist(mnist_copy)
    assert not list((Path(os.environ["ORGANICS_CACHE"]) / "mnist" / "MNIST" / "raw").glob("*.part"))


def test_a_legacy_processed_cache_is_not_read_in_place_of_the_verified_files(mnist_copy):
    """torchvision would load MNIST/processed/*.pt, unchecked, before the raw files."""
    load_mnist(mnist_copy, limit_train=10, limit_test=10)
    processed = Path(os.environ["ORGANICS_CACHE"]) / "mnist" / "MNIST" / "processed"
    processed.mkdir()
    zeros = (torch.zeros(60000, 28, 28, dtype=torch.uint8), torch.zeros(60000, dtype=torch.int64))
    torch.save(zeros, processed / "training.pt")
    torch.save((zeros[0][:10000], zeros[1][:10000]), processed / "test.pt")
    data = load_mnist(mnist_copy, limit_train=10, limit_test=10)
    assert data.x_train.max() > 0 and not processed.exists()


def test_missing_file_raises(mnist_copy):
    (mnist_copy / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataIntegrityError, match="lacks train-images-idx3-ubyte"):
        load_mnist(mnist_copy)


def _stage_after(barrier, source, raw) -> None:
    barrier.wait()
    _stage_raw_files(source, raw)


def test_processes_staging_into_one_cache_at_once_all_succeed(mnist_copy, tmp_path):
    """Two training runs started together stage MNIST into the same cache: neither may fail."""
    raw = tmp_path / "shared_cache" / "raw"
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(4)
    workers = [context.Process(target=_stage_after, args=(barrier, mnist_copy, raw)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [worker.exitcode for worker in workers] == [0, 0, 0, 0]
    assert sorted(path.name for path in raw.iterdir()) == sorted(MNIST_SHA256)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="task"):
        load_mnist(task="cifar")
    with pytest.raises(ValueError, match="image_size"):
        to_sequence(torch.zeros(1, 784), image_size=5)
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="batch_size must be an integer"):
            next(batches(torch.zeros(3), torch.zeros(3), bad))
    with pytest.raises(ValueError, match="image_size must divide 28"):
        load_mnist(task="static", image_size=10)  # before: pooled to 14 x 14 while load_model expected 10 x 10
    for kwargs, name in (({"limit_train": -56990}, "limit_train"), ({"limit_train": 0}, "limit_train"),
                         ({"limit_test": -9995}, "limit_test"), ({"n_val": 2.5}, "n_val"), ({"n_val": True}, "n_val"),
                         ({"n_val": 60_000}, "n_val")):  # fmt: skip
        with pytest.raises(ValueError, match=f"{name} must be an integer"):
            load_mnist(task="static", **kwargs)
    assert input_size("static", np.int64(14)) == 196  # NumPy's integers are integers
    with pytest.raises(ValueError, match="permutation must hold each of 0..783 once"):
        to_sequence(torch.zeros(1, 784), permutation=torch.zeros(784, dtype=torch.int64))


def test_input_size_matches_the_loaded_data():
    assert input_size("static", 14) == load_mnist(task="static", image_size=14, limit_train=10).x_train.shape[-1]
    assert input_size("sequential", 7) == 1 and input_size("permuted") == 1
    with pytest.raises(ValueError, match="task"):
        input_size("cifar")


def test_batches_cover_data_once():
    x = torch.arange(10)
    seen = torch.cat([xb for xb, _ in batches(x, x, 3, shuffle=True, generator=torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == list(range(10))
