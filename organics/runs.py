"""Run directories: checkpoints, metrics and provenance of a training run, and reading them back.

A run directory (written by :func:`organics.train.train`) holds:

- ``metrics.jsonl``: one record per epoch (``"kind": "epoch"``; epoch 0 is the untrained
  model), then a final record (``"kind": "final"``) with the test accuracy of the
  best-validation model;
- ``best.pt``: weights of the best-validation model;
- ``last.pt``: everything needed to resume exactly (model, optimizer, scheduler, random
  states, history), written atomically after every epoch;
- ``provenance.json``: configuration, command, git commit, device, versions, times, and one
  entry per working session (``sessions``) of a resumed run;
- ``diverged.pt``: only after a training step's loss or gradient norm was not finite, that step
  (the weights it used, its batch, loss and gradient norm; the latest such step), which
  :func:`organics.train.replay_diverged_step` computes again;
- ``.lock``: held by the process training the run (:meth:`RunDirectory.lock`), so that a
  second process cannot train the same run at the same time.

:func:`load_run` and :func:`load_model` read a finished run back; :func:`finished_run` says whether
it is one.
"""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import pickle
import platform
import random
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import torch
from torch import nn

from .data import input_size
from .experiments import TrainConfig
from .networks import build_model

try:
    import fcntl
except ImportError:  # not a POSIX system (Windows): run directories are not locked
    fcntl = None

__all__ = [
    "CorruptRunFileError",
    "Progress",
    "RunDirectory",
    "RunInUseError",
    "RunResults",
    "RunSummary",
    "code_version",
    "cpu_model",
    "device_description",
    "finished_run",
    "load_model",
    "load_run",
    "rng_states",
    "set_rng_states",
    "summarize_run",
    "untrained_model",
]


class RunResults(NamedTuple):
    """A run read back by :func:`load_run`: epoch records, the final record (or None), provenance."""

    epochs: list[dict]
    final: dict | None
    provenance: dict


@dataclass
class Progress:
    """Bookkeeping of a run that a checkpoint carries over to its resumption."""

    history: list[dict] = field(default_factory=list)
    epoch: int = 0
    best_val_acc: float = -math.inf
    best_epoch: int = 0
    train_seconds: float = 0.0


def _replace_atomic(write: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    write(tmp)
    os.replace(tmp, path)


_CHECKPOINT_KEYS = ("config", "model", "optimizer", "rng", "epoch")
"""Entries every ``last.pt`` holds (with the scheduler's state and the rest of :class:`Progress`)."""


def _checkpoint_dict(checkpoint: Any) -> dict:
    """``checkpoint`` if it is a training checkpoint (:data:`_CHECKPOINT_KEYS`), else ``ValueError``.

    A ``best.pt`` (weights only) copied over ``last.pt`` is the likely mistake.
    """
    missing = [key for key in _CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise ValueError(f"not a training checkpoint (no {', '.join(missing)}; weights only, a best.pt?)")
    return checkpoint


class CorruptRunFileError(ValueError):
    """A file of a run directory exists but cannot be read: truncated, corrupt, or not what it should be."""


def _read(path: Path, read: Callable[[Path], Any]) -> Any:
    """``read(path)``, its failure to parse an existing file raised as :class:`CorruptRunFileError` (one line)."""
    try:
        return read(path)
    except FileNotFoundError:
        raise
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        detail = next(iter(str(err).splitlines()), "")
        raise CorruptRunFileError(
            f"cannot read {path} (corrupt or truncated?): {type(err).__name__}: {detail}"
        ) from err


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def _json_object(path: Path) -> dict:
    """A JSON file that must hold an object (``provenance.json``): ``ValueError`` otherwise."""
    value = _json(path)
    if not isinstance(value, dict):
        raise ValueError(f"not a JSON object but {type(value).__name__}")
    return value


def _json_lines(path: Path) -> list[dict]:
    """``metrics.jsonl``: one JSON object per line (``ValueError`` for a line that holds anything else)."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict) or "kind" not in record:
            raise ValueError(f"record {number} is not a record of the trainer (a JSON object with a 'kind')")
    return records


class RunInUseError(RuntimeError):
    """Another process holds the run directory's lock: it is training that run now."""


class RunDirectory:
    """The files of one run under ``path``; every write is atomic (:meth:`create` makes the folder)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.metrics = self.path / "metrics.jsonl"
        self.best = self.path / "best.pt"
        self.last = self.path / "last.pt"
        self.provenance = self.path / "provenance.json"
        self.diverged_step = self.path / "diverged.pt"
        self._lock: IO[str] | None = None

    def create(self) -> RunDirectory:
        """Make the folder (and its parents) if missing; returns self."""
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    def lock(self) -> RunDirectory:
        """Hold ``.lock`` (a POSIX record lock) until :meth:`unlock` or the process ends; returns self.

        Two processes training one run would interleave their epochs in its files. The lock is
        per process, as POSIX record locks are: the same process may lock the folder again (a
        notebook re-running a cell), and the first of its :meth:`unlock` calls releases it.
        Where the system or file system has no such locks, the folder is left unlocked.

        Raises
        ------
        RunInUseError
            If another process holds the lock; its process id and host are in the message.
        """
        if fcntl is None or self._lock is not None:
            return self
        handle = open(self.path / ".lock", "a+")  # noqa: SIM115 - held open while the lock lasts
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            if err.errno in (errno.EACCES, errno.EAGAIN):
                raise RunInUseError(f"run directory {self.path} is in use by another process ({holder})") from None
            return self  # no locks on this file system
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {platform.node()}\n")
        handle.flush()
        self._lock = handle
        return self

    def unlock(self) -> None:
        """Release the lock taken by :meth:`lock` (nothing if none is held)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def write_metrics(self, records: list[dict]) -> None:
        """Replace ``metrics.jsonl`` by ``records``, one JSON object per line."""
        text = "".join(json.dumps(r) + "\n" for r in records)
        _replace_atomic(lambda tmp: tmp.write_text(text), self.metrics)

    def save_best(self, model: nn.Module) -> None:
        """Write the model's weights to ``best.pt``."""
        _replace_atomic(lambda tmp: torch.save(model.state_dict(), tmp), self.best)

    def load_best(self, model: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
        """Load ``best.pt`` into ``model``; returns it."""
        model.load_state_dict(_read(self.best, lambda path: torch.load(path, map_location=device, weights_only=True)))
        return model

    def save_checkpoint(self, checkpoint: dict) -> None:
        """Write ``last.pt``."""
        _replace_atomic(lambda tmp: torch.save(checkpoint, tmp), self.last)

    def load_checkpoint(self, device: torch.device | str = "cpu") -> dict | None:
        """``last.pt`` if it exists, else None.

        Raises
        ------
        CorruptRunFileError
            If ``last.pt`` exists but cannot be read, or is not a training checkpoint.
        """
        if not self.last.exists():
            return None
        load = functools.partial(torch.load, map_location=device, weights_only=False)
        return _read(self.last, lambda path: _checkpoint_dict(load(path)))

    def save_diverged_step(self, step: dict) -> None:
        """Write ``diverged.pt``: the training step at which the run diverged (the latest such step)."""
        _replace_atomic(lambda tmp: torch.save(step, tmp), self.diverged_step)

    def load_diverged_step(self) -> dict:
        """``diverged.pt``, on the CPU.

        Raises
        ------
        FileNotFoundError
            If the run has no ``diverged.pt`` (its training never diverged).
        CorruptRunFileError
            If ``diverged.pt`` cannot be read.
        """
        if not self.diverged_step.exists():
            raise FileNotFoundError(f"{self.diverged_step} does not exist: the run's training has not diverged")
        return _read(self.diverged_step, lambda path: torch.load(path, map_location="cpu", weights_only=True))

    def sessions(self) -> list[dict]:
        """Working sessions recorded in ``provenance.json`` so far (empty for a new run)."""
        if not self.provenance.exists():
            return []
        return _read(self.provenance, _json_object).get("sessions", [])

    def write_provenance(self, provenance: dict) -> None:
        """Replace ``provenance.json``."""
        text = json.dumps(provenance, indent=2, default=str)
        _replace_atomic(lambda tmp: tmp.write_text(text), self.provenance)


def load_run(out_dir: str | os.PathLike) -> RunResults:
    """Read a run directory: epoch records, final record, provenance.

    The provenance's ``config`` lists every current :class:`~organics.experiments.TrainConfig`
    field: one added after the run was made takes its default (which is what the run did).

    Raises
    ------
    FileNotFoundError
        If ``out_dir`` has no ``metrics.jsonl``.
    CorruptRunFileError
        If ``metrics.jsonl`` or ``provenance.json`` cannot be parsed.
    """
    out = Path(out_dir)
    records = _read(out / "metrics.jsonl", _json_lines)
    finals = [r for r in records if r.get("kind") == "final"]
    provenance_path = out / "provenance.json"
    provenance = _read(provenance_path, _json_object) if provenance_path.exists() else {}
    if "config" in provenance:
        provenance["config"] = TrainConfig.completed(provenance["config"])
    return RunResults([r for r in records if r.get("kind") == "epoch"], finals[-1] if finals else None, provenance)


def finished_run(out_dir: str | os.PathLike, epochs_planned: int) -> RunResults | None:
    """The results of a run that has trained ``epochs_planned`` epochs and ended its session; otherwise None.

    A session ends with the final record (:meth:`organics.train.Trainer.finish`), which a
    resumed session drops at its start: a run that reached ``epochs_planned`` but was stopped
    before that record was written is not finished, and resuming it writes the record.
    """
    if not (Path(out_dir) / "metrics.jsonl").exists():
        return None
    run = load_run(out_dir)
    if run.final is None or not run.epochs or run.epochs[-1]["epoch"] < epochs_planned:
        return None
    return run


class RunSummary(NamedTuple):
    """What a results table shows of a run (accuracies as fractions).

    ``final_test_acc`` is the test accuracy after the last completed epoch (how the authors
    scored their runs); ``best_val_test_acc`` that of the epoch of best validation accuracy
    (``best_epoch``, the model in ``best.pt``). ``diverged`` is where the latest session's
    training diverged (the trainer's message), or None.
    """

    epochs_completed: int
    epochs_planned: int
    final_test_acc: float
    best_epoch: int
    best_val_test_acc: float
    devices: tuple[str, ...]
    diverged: str | None = None

    @property
    def finished(self) -> bool:
        """Whether every planned epoch is done."""
        return self.epochs_completed >= self.epochs_planned

    @property
    def status(self) -> str:
        """``"finished"``, ``"in progress (k of N epochs)"``, or ``"diverged (k of N epochs)"`` after a divergence."""
        if self.finished:
            return "finished"
        state = "diverged" if self.diverged else "in progress"
        return f"{state} ({self.epochs_completed} of {self.epochs_planned} epochs)"


def summarize_run(out_dir: str | os.PathLike, epochs_planned: int | None = None) -> RunSummary | None:
    """The :class:`RunSummary` of a run directory, or None if it holds no trained epoch yet.

    ``epochs_planned`` defaults to the ``epochs`` of the run's recorded configuration.
    """
    if not (Path(out_dir) / "metrics.jsonl").exists():
        return None
    run = load_run(out_dir)
    trained = [r for r in run.epochs if r["epoch"] > 0]
    if not trained:
        return None
    best = max(run.epochs, key=lambda r: r["val_acc"])  # the first of equals, as the trainer keeps it
    planned = epochs_planned or run.provenance.get("config", {}).get("epochs", trained[-1]["epoch"])
    sessions = run.provenance.get("sessions", [])
    devices = tuple(dict.fromkeys(s["device"] for s in sessions))
    diverged = sessions[-1].get("diverged") if sessions else None
    return RunSummary(
        trained[-1]["epoch"], planned, trained[-1]["test_acc"], best["epoch"], best["test_acc"], devices, diverged
    )


def load_model(out_dir: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The best-validation model of a finished run: built from ``provenance.json``, weights from ``best.pt``.

    Returned in eval mode.

    Raises
    ------
    FileNotFoundError
        If ``out_dir`` has no ``provenance.json`` (the run has not finished) or no ``best.pt``.
    """
    run = RunDirectory(out_dir)
    model = untrained_model(_read(run.provenance, _json_object)["config"])
    return run.load_best(model, device).to(device).eval()


def untrained_model(config: dict) -> nn.Module:
    """The model a run's saved configuration (``TrainConfig.asdict()``) builds, before any weight is loaded."""
    cfg = TrainConfig.completed(config)
    return build_model(cfg["model"], input_size(cfg["task"], cfg["image_size"]), 10, **cfg["model_kwargs"])


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else what :mod:`platform` reports."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def device_description(device: torch.device) -> str:
    """``"cuda: <GPU name>"`` or ``"cpu: <model>, <cores> cores, <threads> torch threads"``."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def code_version(repo: str | Path | None = None) -> dict:
    """``{"git_commit": ..., "git_dirty": ...}`` of a git repository (None where git cannot tell).

    Parameters
    ----------
    repo
        A directory inside the repository; by default the package's own.

    Returns
    -------
    dict
        ``git_commit`` is ``HEAD``; ``git_dirty`` says whether a tracked file outside ``results/``
        differs from it. Files under ``results/`` are what runs write (a resumed run rewrites its
        own, and so does a run started beside it in the same checkout), not the code that ran.
    """
    repo = Path(__file__).resolve().parents[1] if repo is None else Path(repo)

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    status = git("status", "--porcelain", "--untracked-files=no", "--", ":/", ":(top,exclude)results")
    return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": None if status is None else bool(status)}


def rng_states(generator: torch.Generator) -> dict:
    """The states of python's, numpy's and torch's random generators and of ``generator`` (batch order)."""
    states = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "batch_order": generator.get_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict, generator: torch.Generator) -> None:
    """Restore what :func:`rng_states` saved.

    The torch states are byte tensors that must live on the CPU; a checkpoint loaded with
    ``map_location="cuda"`` has moved them, so they are brought back first.
    """
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"].cpu())
    generator.set_state(states["batch_order"].cpu())
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.cpu() for state in states["cuda"]])
