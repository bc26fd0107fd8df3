"""Model-agnostic trainer for the MNIST tasks (static, sequential, permuted sequential).

A model is any ``nn.Module`` of :data:`organics.networks.MODELS` mapping a batch ``x`` to logits.
Training minimises the cross-entropy with Adam (optional StepLR), with NO gradient clipping:
the global gradient norm ``||grad L||_2`` is only measured, at every step, and logged. The run
directory (:mod:`organics.runs`) receives ``metrics.jsonl`` (per epoch: train/validation loss
and accuracy, test accuracy, learning rate, wall time, the gradient norm of every step and its
summary; with the stability monitor on, the largest real part of the circuit Jacobian's
eigenvalues per layer, Fig. 6; for a model with a ``pop_diagnostics()`` method, the counters it
returns after the epoch's training passes and after its evaluation passes, e.g. an SSN's failed
steady states), ``best.pt``, ``last.pt`` and ``provenance.json``.

Command line: a named run of :mod:`organics.experiments`, or every :class:`TrainConfig` field as
an option (given options override the experiment's)::

    python -m organics.train --list-experiments
    python -m organics.train --experiment static/organics2-identity --resume
    python -m organics.train --task static --model mlp --epochs 5 --out runs/mlp

User errors (unknown task, model or experiment, bad numbers or JSON, missing data) print one
line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import math
import os
import platform
import random
import sys
import time
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, NamedTuple, NoReturn

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ._checks import check_choice, check_positive
from .data import MNISTSplits, batches, load_mnist
from .experiments import EXPERIMENTS, TrainConfig, experiment_table
from .networks import count_parameters
from .networks.stability import layer_stability
from .runs import (
    Progress,
    RunDirectory,
    RunInUseError,
    RunResults,
    code_version,
    device_description,
    finished_run,
    load_model,
    load_run,
    rng_states,
    set_rng_states,
    untrained_model,
)

__all__ = [
    "Forward",
    "RunResults",
    "StepGradient",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "load_model",
    "load_run",
    "main",
    "parse_args",
    "replay_diverged_step",
    "separately",
    "train",
    "train_together",
    "training_settings",
]

_RESUMABLE_CHANGES = {"epochs", "resume", "progress", "device", "tf32", "out_dir", "data_root"}
"""Config fields that may differ between an interrupted run and its resumption."""


class TrainingDiverged(RuntimeError):  # noqa: N818 - the name the project's API uses
    """The loss (or the gradient norm) became NaN or infinite; ``last.pt`` is left as it was."""


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but CUDA is not available")
    return torch.device(name)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _grad_norm(model: nn.Module) -> torch.Tensor:
    """Global L2 norm of the gradient, ``sqrt(sum_k ||dL/dtheta_k||^2)``, as a 0-d tensor on the model's device."""
    norms = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


@torch.no_grad()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for xb, yb in batches(x, y, batch_size):
        logits = model(xb)
        loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(-1) == yb).sum())
    return loss_sum / len(x), correct / len(x)


def _stability(model: nn.Module, x: torch.Tensor, cfg: TrainConfig) -> dict:
    layers = layer_stability(model, x, cfg.monitor_iterations)
    return {
        "max_real_eig": [float(s.max_real.max()) for s in layers],
        "median_max_real_eig": [float(s.max_real.median()) for s in layers],
        "fixed_point_residual": [float(s.absolute_residual.max()) for s in layers],
    }


def _diagnostics(model: nn.Module, key: str) -> dict:
    """``{key: model.pop_diagnostics()}`` (counters since its last call, e.g. SSN failures), or ``{}`` without one."""
    pop = getattr(model, "pop_diagnostics", None)
    return {} if pop is None else {key: pop()}


def _summary(values: list[float]) -> dict:
    arr = np.asarray(values)
    return {"min": float(arr.min()), "median": float(np.median(arr)), "max": float(arr.max())}


def _eval_record(model: nn.Module, data: MNISTSplits, cfg: TrainConfig) -> dict:
    val_loss, val_acc = _evaluate(model, data.x_val, data.y_val, cfg.eval_batch_size)
    test_loss, test_acc = _evaluate(model, data.x_test, data.y_test, cfg.eval_batch_size)
    record = {"val_loss": val_loss, "val_acc": val_acc, "test_loss": test_loss, "test_acc": test_acc}
    if cfg.monitor:
        record.update(_stability(model, data.x_test[: cfg.monitor_samples], cfg))
    record.update(_diagnostics(model, "eval_diagnostics"))
    return record


def _check_resumable(saved: dict, cfg: TrainConfig) -> None:
    """Raise ``ValueError`` if ``cfg`` differs from the checkpoint's configuration ``saved`` where it matters.

    A field added to :class:`TrainConfig` after the checkpoint was written counts as its default
    (which is what the run did).
    """
    saved = TrainConfig.completed(saved)
    current = cfg.asdict()
    changed = sorted(k for k in current if k not in _RESUMABLE_CHANGES and saved.get(k) != current[k])
    if changed:
        raise ValueError(
            f"cannot resume: config fields {changed} differ from the checkpoint's "
            f"({ {k: saved.get(k) for k in changed} } -> { {k: current[k] for k in changed} })"
        )


@dataclass
class _Setup:
    """What a run trains: model, optimizer, learning-rate schedule and the batch-order generator."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.StepLR | None
    generator: torch.Generator


def _load_data(cfg: TrainConfig, device: torch.device) -> MNISTSplits:
    return load_mnist(
        cfg.data_root,
        task=cfg.task,
        n_val=cfg.n_val,
        split_seed=cfg.split_seed,
        permutation_seed=cfg.permutation_seed,
        image_size=cfg.image_size,
        limit_train=cfg.limit_train,
        limit_test=cfg.limit_test,
    ).to(device)


def _setup(cfg: TrainConfig, device: torch.device) -> _Setup:
    """Seed everything, then build the model (``cfg.seed`` fixes its initialisation) and its optimizer."""
    _seed_everything(cfg.seed)
    model = untrained_model(cfg.asdict()).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = None
    if cfg.step_size is not None:
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    return _Setup(model, optimizer, scheduler, torch.Generator().manual_seed(cfg.seed))


def _checkpoint(cfg: TrainConfig, setup: _Setup, progress: Progress) -> dict:
    """Everything :func:`_resume` needs to continue exactly where the run is now."""
    return {
        "config": cfg.asdict(),
        "model": setup.model.state_dict(),
        "optimizer": setup.optimizer.state_dict(),
        "scheduler": None if setup.scheduler is None else setup.scheduler.state_dict(),
        "rng": rng_states(setup.generator),
        **dataclasses.asdict(progress),
    }


def _resume(run: RunDirectory, cfg: TrainConfig, setup: _Setup, device: torch.device, sessions: list[dict]) -> Progress:
    """Restore model, optimizer, schedule and random states from ``last.pt``; a new run if the folder has none.

    A folder whose provenance records trained epochs (``sessions``, as read by
    :meth:`organics.runs.RunDirectory.sessions`) but which has no ``last.pt`` (a results folder
    committed without it, say) raises ``ValueError``: starting anew would overwrite its results.
    """
    ckpt = run.load_checkpoint(device)
    if ckpt is None:
        trained = max((session.get("epochs_after", 0) for session in sessions), default=0)
        if trained > 0:
            raise ValueError(
                f"cannot resume {run.path}: its provenance records {trained} trained epochs but it has no last.pt "
                "(restore last.pt, or train anew in another folder: --out-dir)"
            )
        return Progress()
    _check_resumable(ckpt["config"], cfg)
    setup.model.load_state_dict(ckpt["model"])
    setup.optimizer.load_state_dict(ckpt["optimizer"])
    if setup.scheduler is not None:
        setup.scheduler.load_state_dict(ckpt["scheduler"])
    set_rng_states(ckpt["rng"], setup.generator)
    return Progress(**{f.name: ckpt[f.name] for f in dataclasses.fields(Progress)})


def _refuse_to_overwrite(run: RunDirectory) -> None:
    """Raise ``ValueError`` if ``run``'s folder already holds a run's files (a new run would overwrite them)."""
    found = [path.name for path in (run.last, run.metrics, run.provenance) if path.exists()]
    if found:
        raise ValueError(
            f"out_dir {run.path} already holds a run ({', '.join(found)}): continue it with --resume, or train "
            "anew in another folder (--out-dir) or after removing this one"
        )


def _finite_weights(model: nn.Module) -> bool:
    """Whether every parameter of ``model`` is finite (one check, one wait for the device)."""
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())


Forward = Callable[[Sequence[nn.Module], Sequence[torch.Tensor]], list[torch.Tensor]]
"""``forward(models, xs)``: the logits of ``models[i]`` on ``xs[i]`` for every i."""


def separately(models: Sequence[nn.Module], xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each model called on its own batch: the default :data:`Forward`."""
    return [model(x) for model, x in zip(models, xs, strict=True)]


def _loss(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus the model's ``auxiliary_loss`` if it has one (e.g. an autoencoder's reconstruction error)."""
    loss = F.cross_entropy(logits, labels)
    auxiliary = getattr(model, "auxiliary_loss", None)
    return loss if auxiliary is None else loss + auxiliary


def _diverged_step(
    trainer: Trainer, step: int, batch: tuple[torch.Tensor, torch.Tensor], loss: float, grad_norm: float
) -> dict:
    """What ``diverged.pt`` holds: the step's place, loss and gradient norm, the weights it used and its batch.

    Taken before the optimizer step that the divergence skipped, so the model still holds the
    weights the step's forward and backward passes used; everything is moved to the CPU.
    """
    return {
        "config": trainer.cfg.asdict(),
        "epoch": trainer.progress.epoch + 1,
        "step": step,
        "loss": loss,
        "grad_norm": grad_norm,
        "message": trainer.diverged,
        "model": {name: value.detach().cpu() for name, value in trainer.setup.model.state_dict().items()},
        "x": batch[0].detach().cpu(),
        "y": batch[1].detach().cpu(),
    }


def _train_epochs(
    trainers: Sequence[Trainer], forward: Forward, on_step: Callable[[], None] | None = None
) -> list[dict | None]:
    """One pass over each trainer's training set, step k of every run before step k+1 of any.

    Per step, ``forward`` gives every run's logits for its own batch; the sum of the runs' losses
    is backpropagated once (the runs share no parameter, so each gets exactly its own loss's
    gradient) and each run's optimizer steps. The epoch's record of each run (training loss,
    accuracy, gradient norms), or None for a run whose loss or gradient norm was not finite: it
    stops at that step, before its optimizer step, ``trainer.diverged`` says where, and the run's
    ``diverged.pt`` keeps the step (:func:`replay_diverged_step` computes it again).
    On a GPU a step waits for the device once, for every run's loss and gradient norm together;
    the counts of correct answers stay on the device until the epoch ends. ``on_step`` is called
    after every step (a profiler's ``step``, say).
    """
    for trainer in trainers:
        trainer.setup.model.train()
    n_steps = [math.ceil(len(t.data.x_train) / t.cfg.batch_size) for t in trainers]
    iterators = [
        iter(batches(t.data.x_train, t.data.y_train, t.cfg.batch_size, shuffle=True, generator=t.setup.generator))
        for t in trainers
    ]
    sums = [{"loss": 0.0, "correct": 0, "seen": 0, "grad_norms": []} for _ in trainers]
    active = list(range(len(trainers)))
    first = trainers[0]
    steps = tqdm(
        range(1, max(n_steps) + 1),
        desc=f"epoch {first.progress.epoch + 1}" + (f" ({len(trainers)} runs)" if len(trainers) > 1 else ""),
        leave=False,
        disable=not first.cfg.progress,
    )
    for step in steps:
        live = [i for i in active if step <= n_steps[i]]
        if not live:  # every run diverged (or ran out of batches)
            break
        batch = {i: next(iterators[i]) for i in live}
        models = [trainers[i].setup.model for i in live]
        for i in live:
            trainers[i].setup.optimizer.zero_grad(set_to_none=True)
        logits = dict(zip(live, forward(models, [batch[i][0] for i in live]), strict=True))
        losses = {i: _loss(trainers[i].setup.model, logits[i], batch[i][1]) for i in live}
        sum(losses.values()).backward()
        checks = []  # every run's loss and gradient norm, fetched together
        for i in live:
            loss = losses[i].detach().double()
            checks.append(torch.stack([loss, _grad_norm(trainers[i].setup.model).to(loss.device, torch.float64)]))
        for i, (loss_value, grad_norm) in zip(live, torch.stack(checks).tolist(), strict=True):
            trainer, total = trainers[i], sums[i]
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                epoch, run = trainer.progress.epoch + 1, trainer.run
                trainer.diverged = (
                    f"training diverged at epoch {epoch}, step {step}: loss {loss_value}, gradient norm "
                    f"{grad_norm}; {run.last} (epoch {epoch - 1}) and {run.best} are left untouched"
                )
                run.save_diverged_step(_diverged_step(trainer, step, batch[i], loss_value, grad_norm))
                active.remove(i)
                continue
            trainer.setup.optimizer.step()
            total["grad_norms"].append(grad_norm)
            total["loss"] += loss_value * len(batch[i][1])
            total["correct"] += (logits[i].argmax(-1) == batch[i][1]).sum()
            total["seen"] += len(batch[i][1])
        if on_step is not None:
            on_step()
    return [
        None
        if i not in active
        else {
            "kind": "epoch",
            "epoch": trainer.progress.epoch + 1,
            "train_loss": total["loss"] / total["seen"],
            "train_acc": int(total["correct"]) / total["seen"],
            "grad_norm_stats": _summary(total["grad_norms"]),
            "grad_norm": [float(f"{g:.5g}") for g in total["grad_norms"]],
            **_diagnostics(trainer.setup.model, "train_diagnostics"),
        }
        for i, (trainer, total) in enumerate(zip(trainers, sums, strict=True))
    ]


def _end_epoch(cfg: TrainConfig, setup: _Setup, run: RunDirectory, progress: Progress, record: dict) -> None:
    """Record the epoch, keep the best-validation weights, write ``last.pt`` and the metrics."""
    progress.epoch = record["epoch"]
    progress.train_seconds += record["seconds"]
    progress.history.append(record)
    if record["val_acc"] > progress.best_val_acc:
        progress.best_val_acc, progress.best_epoch = record["val_acc"], record["epoch"]
        run.save_best(setup.model)
    run.save_checkpoint(_checkpoint(cfg, setup, progress))
    run.write_metrics(progress.history)


def _final_record(cfg: TrainConfig, setup: _Setup, data: MNISTSplits, run: RunDirectory, progress: Progress) -> dict:
    """Test loss and accuracy of the best-validation model, with the run's totals."""
    model = run.load_best(setup.model, next(setup.model.parameters()).device)
    test_loss, test_acc = _evaluate(model, data.x_test, data.y_test, cfg.eval_batch_size)
    return {
        "kind": "final",
        "best_epoch": progress.best_epoch,
        "best_val_acc": progress.best_val_acc,
        "test_loss": test_loss,
        "test_acc": test_acc,
        "epochs_completed": progress.epoch,
        "train_seconds": progress.train_seconds,
        "n_parameters": count_parameters(model),
    }


class Trainer:
    """One run, set up from its configuration (or resumed from ``last.pt``) and trained epoch by epoch.

    :func:`train` drives one trainer to the end; :mod:`organics.relay` interleaves the epochs of
    several. Creating a trainer locks the run directory for this process
    (:meth:`organics.runs.RunDirectory.lock`; :class:`organics.runs.RunInUseError` if another
    process holds it) and evaluates the untrained model (epoch 0) of a new run.

    Parameters
    ----------
    cfg : TrainConfig
    command : str, optional
        The command line to record in ``provenance.json``.
    data : MNISTSplits, optional
        The run's data, already loaded on the run's device (runs with the same data settings may
        share it); loaded from ``cfg`` if omitted.

    Raises
    ------
    ValueError
        Without ``cfg.resume``, if ``cfg.out_dir`` already holds a run (its ``last.pt``,
        ``metrics.jsonl`` or ``provenance.json``): a new run would overwrite it.
    """

    def __init__(self, cfg: TrainConfig, command: str | None = None, data: MNISTSplits | None = None) -> None:
        self.cfg, self.command = cfg, command
        self.started, self.started_iso, self.version = (
            time.time(),
            datetime.now(timezone.utc).isoformat(),
            code_version(),
        )
        self.device = _device(cfg.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
        self.run = RunDirectory(cfg.out_dir).create().lock()
        if not cfg.resume:
            _refuse_to_overwrite(self.run)
        self.data = data if data is not None else _load_data(cfg, self.device)
        self.setup = _setup(cfg, self.device)
        self.earlier_sessions = self.run.sessions() if cfg.resume else []
        self.progress = (
            _resume(self.run, cfg, self.setup, self.device, self.earlier_sessions) if cfg.resume else Progress()
        )
        self.epochs_before = self.progress.epoch
        self.diverged: str | None = None
        """Where training diverged (epoch, step, loss, gradient norm), or None."""
        self.run.write_metrics(self.progress.history)
        if not self.progress.history:  # a new run (a resumed one holds at least its epoch 0)
            self._evaluate_untrained()

    def _evaluate_untrained(self) -> None:
        tic = time.time()
        record = {"kind": "epoch", "epoch": 0, "train_loss": None, "train_acc": None}
        record.update(_eval_record(self.setup.model, self.data, self.cfg))
        record.update(lr=self.setup.optimizer.param_groups[0]["lr"], seconds=time.time() - tic)
        self.progress.history.append(record)
        self.progress.best_val_acc = record["val_acc"]
        self.run.save_best(self.setup.model)
        self.run.save_checkpoint(_checkpoint(self.cfg, self.setup, self.progress))
        self.run.write_metrics(self.progress.history)

    @property
    def done(self) -> bool:
        """Whether ``cfg.epochs`` epochs are completed, or training diverged."""
        return self.diverged is not None or self.progress.epoch >= self.cfg.epochs

    def train_epoch(self) -> dict:
        """Train one more epoch, evaluate, save ``last.pt`` (and ``best.pt`` if better); the epoch's record.

        Raises
        ------
        TrainingDiverged
            At the first step whose loss or gradient norm is not finite (before the optimizer
            step); ``last.pt`` and ``best.pt`` keep the last good epoch, ``provenance.json``
            records the session with where it diverged, and ``diverged.pt`` keeps the step.
        """
        record = train_together([self])[0]
        if record is None:
            raise TrainingDiverged(self.diverged)
        return record

    def finish(self) -> RunResults:
        """Test the best-validation model, write the final record and ``provenance.json`` (this session appended).

        This ends the session: the model then holds the best-validation weights (``best.pt``), not
        the last epoch's, so a run is trained further by a new trainer resuming from ``last.pt``.
        """
        final = _final_record(self.cfg, self.setup, self.data, self.run, self.progress)
        self.run.write_metrics([*self.progress.history, final])
        provenance = _provenance(self, final)
        self.run.write_provenance(provenance)
        return RunResults(self.progress.history, final, provenance)


@contextmanager
def _subnormals_flushed() -> Iterator[None]:
    """Treat subnormal floats as zero on the CPU while training runs, then restore torch's default (off).

    The fixed-point iterations of trained static layers produce subnormal numbers (below 1e-38
    in float32), with which a CPU computes several times slower (a training step of the
    paper-era 50-unit model at epoch 98: 189 ms, flushed 67-81 ms); as zero they change nothing
    measurable. The setting is the CPU's and process-wide (NumPy's arithmetic shares it), and
    torch cannot report it, so it is switched off again afterwards rather than restored.
    """
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
"""glibc's ``mallopt`` parameters (``malloc.h``)."""

_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}


@contextmanager
def _freed_memory_kept() -> Iterator[None]:
    """Keep the memory that training frees for its next allocations (glibc on Linux; elsewhere a no-op).

    glibc serves an allocation above its mmap threshold (128 KiB, rising to at most 32 MiB as such
    blocks are freed), such as the whole-sequence buffers of a CPU training step (B T n floats),
    with fresh pages from the operating system and hands them back when it is freed, so every
    training step pays one page fault per 4 KiB (B = 256, T = 784, n = 64, numba engine: 100,000
    faults and 0.15 s of system time in a 0.64 s step on this project's 2-core development machine;
    kept: no fault, 0.52 s). Inside, ``mallopt(M_MMAP_MAX, 0)`` serves every allocation from
    malloc's heap and ``mallopt(M_TRIM_THRESHOLD, -1)`` keeps what is freed there (the process keeps
    its peak memory; in that measurement, with an evaluation pass of 1,000 sequences in between,
    2.44 GB at its peak against 2.25 GB). Afterwards glibc's default values are set again and the
    kept memory is returned (``malloc_trim(0)``); glibc's adaptive mmap threshold stays off for the
    rest of the process.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        yield
        return
    libc = ctypes.CDLL(None)
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, -1)
    try:
        yield
    finally:
        for parameter, value in _GLIBC_DEFAULTS.items():
            libc.mallopt(parameter, value)
        libc.malloc_trim(0)


@contextmanager
def training_settings() -> Iterator[None]:
    """The process-wide settings under which the trainer trains and evaluates, set back to the defaults afterwards.

    Both concern the CPU: subnormal floats are flushed to zero (the fixed-point iterations of
    trained static layers produce them, and so does an LSTM's backward pass through 784 steps, whose
    gradient vanishes through time; a CPU computes with them many times slower: an LSTM training
    step at B = 256, T = 784, n = 128 on two threads, 9.0 s, flushed 0.88 s), and the C library
    keeps the memory that is freed for the next allocations instead of returning it to the operating
    system, which would hand it back page by page, one page fault per 4 KiB, at every training step
    (glibc on Linux; elsewhere unchanged). Keeping memory changes no number; flushing sets numbers
    below 1.2e-38 in float32 (2.2e-308 in float64) to zero. A training step of the paper-era cell on
    one CPU thread at B = 256, T = 784, n = 64 took 0.64 s without the second and 0.52 s with it.
    :mod:`organics.benchmark` times training steps under these settings too.
    """
    with _subnormals_flushed(), _freed_memory_kept():
        yield


def train_together(
    trainers: Sequence[Trainer], forward: Forward = separately, on_step: Callable[[], None] | None = None
) -> list[dict | None]:
    """One more epoch of every trainer, their steps interleaved; each run's epoch record, None where it diverged.

    Step k of every run comes before step k+1 of any, so that ``forward`` can run the models of
    a step together (:func:`organics.networks.rnn.classify_together` puts ORGaNICs RNNs of the
    same shape into one kernel launch); the numbers are those of training each run alone. Then
    each run's learning rate schedule steps, the run is evaluated and saved as
    :meth:`Trainer.train_epoch` does. A record's ``seconds`` is the shared training pass plus
    the run's own evaluation, and ``runs_together`` says how many runs shared the pass. A run
    whose training diverges (a loss or gradient norm that is not finite, or weights that are not
    finite at the end of the epoch) is left at its last good epoch; its ``diverged`` says where,
    and so does its session in ``provenance.json``, written then.
    The whole epoch (training, evaluation, saving) runs under :func:`training_settings`.
    ``on_step`` is called after every training step.
    """
    with training_settings():  # once for the whole epoch: the memory kept in training serves the evaluations
        tic = time.time()
        records = _train_epochs(trainers, forward, on_step)
        shared = time.time() - tic
        for i, (trainer, record) in enumerate(zip(trainers, records, strict=True)):
            if record is not None and not _finite_weights(trainer.setup.model):  # the epoch's last optimizer step
                epoch, run = record["epoch"], trainer.run
                trainer.diverged = (
                    f"training diverged at the end of epoch {epoch}: its last optimizer step left non-finite "
                    f"weights; {run.last} (epoch {epoch - 1}) and {run.best} are left untouched"
                )
                records[i] = record = None
            if record is None:  # the session goes on record with where it diverged
                trainer.run.write_provenance(_provenance(trainer, None))
                continue
            tic = time.time()
            setup = trainer.setup
            lr = setup.optimizer.param_groups[0]["lr"]
            if setup.scheduler is not None:
                setup.scheduler.step()
            record.update(_eval_record(setup.model, trainer.data, trainer.cfg))
            record.update(lr=lr, seconds=shared + time.time() - tic)
            if len(trainers) > 1:
                record["runs_together"] = len(trainers)
            _end_epoch(trainer.cfg, setup, trainer.run, trainer.progress, record)
            trainer.run.write_provenance(_provenance(trainer, None))  # an interrupted session stays on record
    return records


class StepGradient(NamedTuple):
    """The loss and gradient of one training step, as :func:`replay_diverged_step` computes them again.

    Attributes
    ----------
    loss : float
        ``L = cross_entropy(model(x), y)`` (plus the model's auxiliary loss, if any).
    grad_norm : float
        ``||grad L||_2`` over every parameter, as the trainer measures it (NaN if an entry is).
    nonfinite : dict of str to (int, int)
        Per parameter name: the number of entries of its gradient that are not finite, and of all its entries.
    input_grad_norm : numpy.ndarray
        ``||dL/dx_{b,t}||_2`` over the input features, for every example b of the batch and
        every position t of the input's second axis, shape (B, T): for a sequence x of shape
        (B, T, input_size), how much of the gradient reaches back to each of its steps.
    """

    loss: float
    grad_norm: float
    nonfinite: dict[str, tuple[int, int]]
    input_grad_norm: np.ndarray


def replay_diverged_step(
    out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32, weights: Mapping[str, torch.Tensor] | None = None
) -> StepGradient:
    """The loss and gradient of the training step at which a run diverged, computed again in ``dtype`` on the CPU.

    From the run's ``diverged.pt`` (:meth:`organics.runs.RunDirectory.load_diverged_step`): the
    model of the run's configuration, with the weights the step used, in training mode, on the
    step's batch (x, y); ``L = cross_entropy(model(x), y)`` and one backward pass for
    ``grad L``, under :func:`training_settings` as the trainer computes them. In float32, on
    the CPU that trained the run, this gives the trainer's loss and gradient norm again; in
    float64, whether the gradient was finite but beyond float32's largest number (3.4e38), an
    overflow, or not finite in any precision.

    ``weights`` (a state dict, e.g. the ``"model"`` of the run's ``last.pt``: its last good
    epoch) replaces the step's own weights, to see the same batch through other weights.

    Raises
    ------
    FileNotFoundError
        If the run has no ``diverged.pt``.
    """
    step = RunDirectory(out_dir).load_diverged_step()
    model = untrained_model(step["config"]).to(dtype)
    model.load_state_dict(step["model"] if weights is None else weights)
    model.train()
    x = step["x"].to(dtype).requires_grad_()
    with training_settings():
        loss = _loss(model, model(x), step["y"])
        loss.backward()
    nonfinite = {
        name: (int((~torch.isfinite(p.grad)).sum()), p.grad.numel())
        for name, p in model.named_parameters()
        if p.grad is not None
    }
    input_grad_norm = torch.linalg.vector_norm(x.grad.reshape(*x.shape[:2], -1), dim=-1).numpy()
    return StepGradient(float(loss.detach()), float(_grad_norm(model)), nonfinite, input_grad_norm)


def train(cfg: TrainConfig, command: str | None = None, minutes: float | None = None) -> RunResults:
    """Train ``cfg.model`` on ``cfg.task``; write the run directory; return its results.

    Per step: ``L = cross_entropy(model(x), y)``, backward, ``||grad L||_2`` logged (never
    clipped), Adam step. Per epoch: validation and test evaluation, best-validation model
    kept in ``best.pt``, ``last.pt`` written. An interrupted run resumed with
    ``cfg.resume=True`` reproduces the uninterrupted run exactly (same device).

    Parameters
    ----------
    cfg : TrainConfig
    command : str, optional
        The command line to record in ``provenance.json`` (the CLI passes ``sys.argv``).
    minutes : float, optional
        A wall-clock budget for this session, counted from the call (a batch job's time limit).
        An epoch starts only if it is expected to end within the budget: expected to take as long
        as the longest epoch of this session so far, or, before the first, as the last epoch of the
        latest earlier session on the same kind of device (without one, the first epoch starts).
        The session then ends as after the last epoch (best-validation model tested, which the
        budget does not count; ``provenance.json`` written), and ``cfg.resume=True`` continues the
        run later with the same numbers as an uninterrupted one.

    Returns
    -------
    RunResults
        Of the run as this call leaves it. Resuming a run that has finished ``cfg.epochs`` epochs
        (:func:`organics.runs.finished_run`) trains nothing, changes none of its files and
        returns its results.

    Raises
    ------
    ValueError
        If ``minutes`` is not positive.
    TrainingDiverged
        If the loss or gradient norm becomes NaN/inf; the message names the epoch and step,
        and ``last.pt`` / ``best.pt`` still hold the last good epoch. ``provenance.json`` records
        the session with the message as its ``"diverged"``, and ``diverged.pt`` keeps the step
        (:func:`replay_diverged_step`).
    RunInUseError
        If another process is training in ``cfg.out_dir`` (:meth:`organics.runs.RunDirectory.lock`).
    """
    check_positive("minutes", minutes, optional=True)
    done = finished_run(cfg.out_dir, cfg.epochs) if cfg.resume else None
    if done is not None:  # nothing to train: a session would only rewrite its files and record no epoch
        _check_resumable(done.provenance["config"], cfg)
        return done
    trainer = Trainer(cfg, command)
    try:
        deadline = None if minutes is None else trainer.started + 60 * minutes
        epochs = tqdm(
            range(trainer.progress.epoch + 1, cfg.epochs + 1), desc=cfg.model, disable=not cfg.progress, unit="epoch"
        )
        for _ in epochs:
            estimate = None if deadline is None else _epoch_estimate(trainer)
            if estimate is not None and time.time() + estimate > deadline:
                break
            record = trainer.train_epoch()
            epochs.set_postfix(val_acc=f"{record['val_acc']:.4f}", loss=f"{record['train_loss']:.4f}")
        return trainer.finish()
    finally:
        trainer.run.unlock()


def _epoch_estimate(trainer: Trainer) -> float | None:
    """Seconds the trainer's next epoch is expected to take, or None where nothing tells.

    The longest epoch of this session; before its first, the last epoch of the latest earlier
    session on a device of the same description (:func:`organics.runs.device_description`).
    """
    seconds = {r["epoch"]: r["seconds"] for r in trainer.progress.history}
    this_session = [seconds[e] for e in seconds if e > trainer.epochs_before]
    if this_session:
        return max(this_session)
    device = device_description(trainer.device)
    same = [s for s in trainer.earlier_sessions if s["device"] == device and s["epochs_after"] > s["epochs_before"]]
    return seconds.get(same[-1]["epochs_after"]) if same else None


def _provenance(trainer: Trainer, final: dict | None) -> dict:
    """``provenance.json``: this session appended to the run's earlier ones, configuration, versions, result.

    Written after every epoch (``final`` None: the session is ``"in_progress"`` and has no result
    yet), so a session that is interrupted stays on record; then once more by :meth:`Trainer.finish`.
    """
    cfg, progress = trainer.cfg, trainer.progress
    session = {
        "command": trainer.command or f"organics.train.train({cfg!r})",
        **trainer.version,
        "device": device_description(trainer.device),
        "started": trainer.started_iso,
        "finished": datetime.now(timezone.utc).isoformat(),
        "wall_seconds": time.time() - trainer.started,
        "epochs_before": trainer.epochs_before,
        "epochs_after": progress.epoch,
        "tf32": cfg.tf32 and trainer.device.type == "cuda",
        "engine": getattr(trainer.setup.model, "engine", None),  # an ORGaNICs RNN's scan engine
        "in_progress": final is None,
        "diverged": trainer.diverged,  # where the session's training diverged, or None
    }
    sessions = [*trainer.earlier_sessions, session]
    return {
        **session,
        "config": cfg.asdict(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "epochs_completed": progress.epoch,
        "train_seconds": progress.train_seconds,
        "wall_seconds_all_sessions": sum(s["wall_seconds"] for s in sessions),
        "sessions": sessions,
        "result": None
        if final is None
        else {k: final[k] for k in ("best_epoch", "best_val_acc", "test_acc", "n_parameters")},
    }


def _option_parser(kind: Any) -> tuple[Any, bool]:
    """The argparse ``type`` for a field annotation, and whether ``None`` is allowed."""
    optional = False
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        optional, kind = True, args[0]
    if kind is dict:
        return _json_object, optional
    return kind, optional


def _json_object(text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


_json_object.__name__ = "JSON object"


def _none_or(parse: Any) -> Any:
    def parse_optional(text: str) -> Any:
        return None if text.lower() == "none" else parse(text)

    parse_optional.__name__ = getattr(parse, "__name__", "value")
    return parse_optional


class _OneLineParser(argparse.ArgumentParser):
    """Reports a usage error as one line on stderr and exits with status 2 (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """Parser: an option per :class:`TrainConfig` field; ``--experiment``, ``--list-experiments``, ``--minutes``.

    ``--minutes`` belongs to the session, not to the run (see :func:`train`). Options that are not
    given are absent from the parsed namespace, so that they do not override an experiment's
    settings.
    """
    parser = _OneLineParser(
        prog="python -m organics.train",
        description=__doc__.split("\n\n")[0],
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,  # an abbreviated --list-experiments must not start a default run
    )
    parser.add_argument("--experiment", help=f"a named run: one of {', '.join(EXPERIMENTS)}")
    parser.add_argument("--list-experiments", action="store_true", help="list the named runs and exit")
    parser.add_argument(
        "--minutes",
        type=float,
        help="wall-clock budget of this session: no epoch starts that would end after it (continue with --resume)",
    )
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flags = [f"--{f.name.replace('_', '-')}", *f.metadata.get("aliases", [])]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        parse, optional = _option_parser(hints[f.name])
        help_text = f"default: {json.dumps(default)}" + (" ('none' for None)" if optional else "")
        if parse is bool:
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
            continue
        parser.add_argument(*flags, dest=f.name, type=_none_or(parse) if optional else parse, help=help_text)
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from command-line arguments (an ``--experiment``'s settings, then the options given).

    Raises
    ------
    ValueError
        For an unknown experiment or an invalid configuration (naming the field).
    """
    return _parse_command_line(argv)[0]


def _parse_command_line(argv: list[str] | None) -> tuple[TrainConfig, float | None]:
    """The run's :class:`TrainConfig` (see :func:`parse_args`) and the session's ``--minutes`` (None if not given)."""
    options = vars(build_parser().parse_args(argv))
    options.pop("list_experiments", None)
    minutes = options.pop("minutes", None)
    name = options.pop("experiment", None)
    if name is None:
        return TrainConfig(**options), minutes
    check_choice("experiment", name, list(EXPERIMENTS))
    return EXPERIMENTS[name].config(**options), minutes


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: train, then print the final record (errors: one line, exit status 2)."""
    argv = sys.argv[1:] if argv is None else argv
    prog = "python -m organics.train"
    if "--list-experiments" in argv:
        build_parser().parse_args(argv)
        print(experiment_table())
        return
    try:
        cfg, minutes = _parse_command_line(argv)
        if cfg.resume and finished_run(cfg.out_dir, cfg.epochs) is not None:
            print(f"{prog}: {cfg.out_dir} has finished its {cfg.epochs} epochs: nothing to train (--epochs extends it)",
                  file=sys.stderr)  # fmt: skip
        results = train(cfg, command=" ".join([prog, *argv]), minutes=minutes)
    except (ValueError, OSError, RunInUseError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as err:
        print(f"{prog}: {err}", file=sys.stderr)
        sys.exit(1)
    epochs = results.provenance["epochs_completed"]
    if epochs < cfg.epochs and minutes is not None:
        print(
            f"{prog}: stopped after epoch {epochs} of {cfg.epochs}: the next would end after the {minutes:g}-minute "
            "budget (--resume continues the run)",
            file=sys.stderr,
        )
    print(json.dumps(results.final))


if __name__ == "__main__":
    main()
