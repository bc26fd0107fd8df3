"""Timing one training step (forward + backward) of the ORGaNICs RNN and of nn.LSTM, interleaved.

The contestants are the ORGaNICs RNN with each of its implementations (``"loop"``: the readable
cell step by step; ``"scan"``: the fast whole-sequence path with the device's default engine,
``"scan-torch"``, ``"scan-triton"`` and ``"scan-persistent"``: with that engine) and ``nn.LSTM``
(``"lstm"``); a name ending in ``*k`` (``"scan-persistent*4"``) times k independent copies
trained side by side on the same batch (:func:`organics.networks.rnn.classify_together`: with
the persistent engine, one kernel launch per direction for all k), and its row also gives the
time per copy. Used by
``benchmarks/rnn_step.py`` (which writes the results to JSON), by chapter 7 and by the GPU relay
(:mod:`organics.relay`).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .networks import LSTMClassifier, ORGaNICsRNN
from .networks.rnn import classify_together
from .runs import code_version, cpu_model
from .train import training_settings

__all__ = [
    "CONTESTANTS",
    "RunsTogether",
    "benchmark",
    "build",
    "machine",
    "time_epoch",
    "time_step",
    "training_step",
    "write_record",
]

CONTESTANTS = ("loop", "scan", "lstm")


class RunsTogether(nn.Module):
    """Independent models trained side by side on the same batch: their logits concatenated (copy after copy)."""

    def __init__(self, models: list[nn.Module]) -> None:
        super().__init__()
        self.copies = nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``cat([model(x) for model in copies])``, computed by :func:`organics.networks.rnn.classify_together`."""
        return torch.cat(classify_together(list(self.copies), [x] * len(self.copies)))


def _copies(name: str) -> int:
    """k of a contestant named ``"...*k"``, else 1."""
    return int(name.partition("*")[2] or 1)


def build(name: str, hidden_size: int, preset: str = "original") -> torch.nn.Module:
    """The model timed under ``name``: the ORGaNICs RNN (cell ``preset``) with that implementation, or nn.LSTM.

    ``"name*k"``: :class:`RunsTogether` of k such models.
    """
    single, _, copies = name.partition("*")
    if copies:
        return RunsTogether([build(single, hidden_size, preset) for _ in range(int(copies))])
    if name == "lstm":
        return LSTMClassifier(1, hidden_size, 10)
    impl, _, engine = name.partition("-")
    return ORGaNICsRNN(1, hidden_size, 10, preset=preset, impl=impl, engine=engine or "auto")


def training_step(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor) -> None:
    """Forward, cross-entropy, backward (what the trainer does per batch, without the optimizer)."""
    model.zero_grad(set_to_none=True)
    logits = model(x)
    F.cross_entropy(logits, labels.repeat(len(logits) // len(labels))).backward()


def time_step(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor) -> float:
    """Seconds of one training step (synchronising the GPU)."""
    if x.is_cuda:
        torch.cuda.synchronize()
    tic = time.perf_counter()
    training_step(model, x, labels)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - tic


def time_epoch(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, steps: int) -> float:
    """Seconds of ``steps`` training steps with an Adam update each (a synthetic epoch on one batch)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    if x.is_cuda:
        torch.cuda.synchronize()
    tic = time.perf_counter()
    for _ in range(steps):
        training_step(model, x, labels)
        optimizer.step()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - tic


def benchmark(
    batch: int,
    T: int,
    hidden_size: int,
    device: str,
    repeats: int,
    models: tuple[str, ...] = CONTESTANTS,
    preset: str = "original",
    epoch_limit: float | None = None,
    epoch_models: tuple[str, ...] | None = None,
) -> dict:
    """Median seconds per training step of each model, interleaved over ``repeats`` rounds (after one warm-up).

    Timed under the trainer's process settings (:func:`organics.train.training_settings`).

    With ``epoch_limit``, also the seconds of a whole epoch (``ceil(57000 / batch)`` steps with
    Adam) of every model of ``epoch_models`` (default: all) whose step time predicts an epoch
    under ``epoch_limit`` seconds.
    """
    torch.manual_seed(0)
    x = torch.rand(batch, T, 1, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    built = {name: build(name, hidden_size, preset).to(device) for name in models}
    times = {name: [] for name in models}
    with training_settings():
        for model in built.values():
            training_step(model, x, labels)
        for _ in range(repeats):
            for name, model in built.items():
                times[name].append(time_step(model, x, labels))
    median = {name: statistics.median(ts) for name, ts in times.items()}
    row = {"batch": batch, "T": T, "hidden_size": hidden_size, "preset": preset, "device": device, "repeats": repeats}
    row["seconds"] = {name: {"median": median[name], "all": times[name]} for name in models}
    if "lstm" in median:
        row["ratio_to_lstm"] = {name: median[name] / median["lstm"] for name in models if name != "lstm"}
    together = [name for name in models if _copies(name) > 1]
    if together:
        row["seconds_per_copy"] = {name: median[name] / _copies(name) for name in together}
    if epoch_limit is not None:
        steps = -(-57_000 // batch)
        row["epoch_steps"] = steps
        with training_settings():
            row["epoch_seconds"] = {
                name: time_epoch(built[name], x, labels, steps)
                for name in (models if epoch_models is None else epoch_models)
                if median[name] * steps < epoch_limit
            }
        if "lstm" in row["epoch_seconds"]:
            lstm = row["epoch_seconds"]["lstm"]
            row["epoch_ratio_to_lstm"] = {k: v / lstm for k, v in row["epoch_seconds"].items() if k != "lstm"}
    return row


def _installed(package: str) -> str | None:
    """The installed version of ``package``, or None."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine(device: str) -> dict:
    """CPU/GPU model, threads, load, versions and the git commit (on a GPU also Triton's version, which compiles
    the Triton engines; on the CPU numba's version and the threads ``OPENBLAS_NUM_THREADS`` allows the BLAS it
    calls)."""
    info = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["triton"] = _installed("triton")
    else:
        info["numba"] = _installed("numba")
        info["openblas_threads"] = os.getenv("OPENBLAS_NUM_THREADS")
    return {**info, **code_version()}


def write_record(record: dict, path: str | Path) -> None:
    """Write a benchmark's ``record`` to ``path`` as indented JSON (making its folder) and say so."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")
