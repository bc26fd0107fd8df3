"""Model-agnostic trainer for the MNIST tasks (static, sequential, permuted sequential).

A model is any ``nn.Module`` mapping a batch ``x`` to logits, built by name from
:mod:`organics.registry`. Training minimises the cross-entropy with Adam (optional StepLR),
with NO gradient clipping: the global gradient norm ``||grad L||_2`` is only measured, at
every step, and logged. The run directory ``out_dir`` receives:

- ``metrics.jsonl``: one record per epoch (``"kind": "epoch"``; epoch 0 is the untrained
  model) with train/validation loss and accuracy, test accuracy, learning rate, wall time,
  the gradient norm of every step and its summary, and, if the stability monitor is on, the
  largest real part of the circuit Jacobian's eigenvalues per layer (Fig. 6); then a final
  record (``"kind": "final"``) with the test accuracy of the best-validation model;
- ``best.pt`` (model of the best validation accuracy), ``last.pt`` (everything needed to
  resume exactly: model, optimizer, scheduler, RNG and batch-order states, history);
- ``provenance.json``: command, configuration, git commit, device, versions, times.

Command line (every :class:`TrainConfig` field is an option)::

    python -m organics.train --task static --model organics2 --epochs 20 --out results/static_mnist/organics2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import MNISTSplits, batches, load_mnist
from .registry import build_model

__all__ = ["RunResults", "TrainConfig", "TrainingDiverged", "load_model", "load_run", "main", "parse_args", "train"]

_RESUMABLE_CHANGES = {"epochs", "resume", "progress", "device", "out_dir", "data_root"}
"""Config fields that may differ between an interrupted run and its resumption."""


class TrainingDiverged(RuntimeError):  # noqa: N818 - the name the project's API uses
    """The loss (or the gradient norm) became NaN or infinite; ``last.pt`` is left as it was."""


@dataclass
class TrainConfig:
    """Configuration of one training run (each field is also a command-line option).

    Attributes
    ----------
    task : {"static", "sequential", "permuted"}
        Data from :func:`organics.data.load_mnist`.
    model : str
        A name in :mod:`organics.registry` (e.g. ``"organics2"``, ``"mlp"``) or ``"module:factory"``.
    model_kwargs : dict
        Keyword arguments of the model factory (JSON on the command line).
    epochs, batch_size, lr, weight_decay : int, int, float, float
        Training schedule: Adam (``torch.optim.Adam``, whose ``weight_decay`` adds
        ``weight_decay * theta`` to the gradient).
    step_size, gamma : int or None, float
        StepLR: multiply the learning rate by ``gamma`` every ``step_size`` epochs (None: constant).
    seed : int
        Seeds python, numpy, torch (model initialisation) and the batch order.
    device : {"auto", "cpu", "cuda"}
        ``"auto"`` picks CUDA when available.
    out_dir : str
        Run directory.
    limit_train, limit_test, image_size, n_val, split_seed, permutation_seed, data_root
        Passed to :func:`organics.data.load_mnist` (limits and ``image_size < 28`` are for
        quick runs).
    eval_batch_size : int
        Batch size for evaluation.
    monitor : bool
        Log, every epoch, the largest real part of the circuit Jacobian's eigenvalues at each
        layer's fixed point over the first ``monitor_samples`` test inputs (the model needs a
        ``fixed_points`` method, see :mod:`organics.monitor`).
    monitor_samples, monitor_iterations : int
        Test inputs monitored; Algorithm 1 iterations used to refine their fixed points.
    resume : bool
        Continue from ``out_dir/last.pt`` if it exists.
    progress : bool
        Show tqdm progress bars.
    """

    task: str = "static"
    model: str = "organics2"
    model_kwargs: dict = field(default_factory=dict)
    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-5
    step_size: int | None = None
    gamma: float = 0.8
    seed: int = 0
    device: str = "auto"
    out_dir: str = field(default="results/run", metadata={"aliases": ["--out"]})
    limit_train: int | None = None
    limit_test: int | None = None
    image_size: int = 28
    n_val: int = 3000
    split_seed: int = 0
    permutation_seed: int = 0
    data_root: str | None = None
    eval_batch_size: int = 1000
    monitor: bool = False
    monitor_samples: int = 256
    monitor_iterations: int = 100
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "monitor_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.step_size is not None and self.step_size < 1:
            raise ValueError(f"step_size must be >= 1 or None, got {self.step_size}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if not isinstance(self.model_kwargs, dict):
            raise ValueError(f"model_kwargs must be a dict, got {type(self.model_kwargs).__name__}")


class RunResults(NamedTuple):
    """A run read back by :func:`load_run`: epoch records, the final record (or None), provenance."""

    epochs: list[dict]
    final: dict | None
    provenance: dict


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but CUDA is not available")
    return torch.device(name)


def _device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {_cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def _cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else what :mod:`platform` reports."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def _git_commit() -> dict:
    repo = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": None if status is None else bool(status)}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_states(generator: torch.Generator) -> dict:
    states = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "batch_order": generator.get_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict, generator: torch.Generator) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    generator.set_state(states["batch_order"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_json_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def _write_metrics(records: list[dict], path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def _grad_norm(model: nn.Module) -> float:
    """Global L2 norm of the gradient, ``sqrt(sum_k ||dL/dtheta_k||^2)``."""
    norms = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


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
    from .monitor import layer_stability

    layers = layer_stability(model, x, cfg.monitor_iterations)
    return {
        "max_real_eig": [float(s.max_real.max()) for s in layers],
        "median_max_real_eig": [float(s.max_real.median()) for s in layers],
        "fixed_point_residual": [float(s.residual.max()) for s in layers],
    }


def _summary(values: list[float]) -> dict:
    arr = np.asarray(values)
    return {"min": float(arr.min()), "median": float(np.median(arr)), "max": float(arr.max())}


def _eval_record(model: nn.Module, data: MNISTSplits, cfg: TrainConfig) -> dict:
    val_loss, val_acc = _evaluate(model, data.x_val, data.y_val, cfg.eval_batch_size)
    test_loss, test_acc = _evaluate(model, data.x_test, data.y_test, cfg.eval_batch_size)
    record = {"val_loss": val_loss, "val_acc": val_acc, "test_loss": test_loss, "test_acc": test_acc}
    if cfg.monitor:
        record.update(_stability(model, data.x_test[: cfg.monitor_samples], cfg))
    return record


def _config_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def _check_resumable(saved: dict, cfg: TrainConfig) -> None:
    current = _config_dict(cfg)
    changed = sorted(k for k in current if k not in _RESUMABLE_CHANGES and saved.get(k) != current[k])
    if changed:
        raise ValueError(
            f"cannot resume: config fields {changed} differ from the checkpoint's "
            f"({ {k: saved.get(k) for k in changed} } -> { {k: current[k] for k in changed} })"
        )


def train(cfg: TrainConfig, command: str | None = None) -> RunResults:
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

    Raises
    ------
    TrainingDiverged
        If the loss or gradient norm becomes NaN/inf; the message names the epoch and step,
        and ``last.pt`` / ``best.pt`` still hold the last good epoch.
    """
    started = time.time()
    started_iso = datetime.now(timezone.utc).isoformat()
    code_version = _git_commit()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = _device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False

    data = load_mnist(
        cfg.data_root,
        task=cfg.task,
        n_val=cfg.n_val,
        split_seed=cfg.split_seed,
        permutation_seed=cfg.permutation_seed,
        image_size=cfg.image_size,
        limit_train=cfg.limit_train,
        limit_test=cfg.limit_test,
    ).to(device)
    _seed_everything(cfg.seed)
    model = build_model(cfg.model, in_features=data.x_train.shape[-1], n_classes=10, **cfg.model_kwargs).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = (
        torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
        if cfg.step_size is not None
        else None
    )
    generator = torch.Generator().manual_seed(cfg.seed)

    last_path, best_path = out / "last.pt", out / "best.pt"
    history: list[dict] = []
    epoch, best_val_acc, best_epoch, train_seconds = 0, -math.inf, 0, 0.0
    sessions: list[dict] = []
    if cfg.resume and last_path.exists():
        ckpt = torch.load(last_path, map_location=device, weights_only=False)
        _check_resumable(ckpt["config"], cfg)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_states(ckpt["rng"], generator)
        history, epoch = ckpt["history"], ckpt["epoch"]
        best_val_acc, best_epoch, train_seconds = ckpt["best_val_acc"], ckpt["best_epoch"], ckpt["train_seconds"]
        provenance_path = out / "provenance.json"
        if provenance_path.exists():
            sessions = json.loads(provenance_path.read_text()).get("sessions", [])
    _write_metrics(history, out / "metrics.jsonl")

    def checkpoint() -> None:
        _save_atomic(
            {
                "config": _config_dict(cfg),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": None if scheduler is None else scheduler.state_dict(),
                "rng": _rng_states(generator),
                "history": history,
                "epoch": epoch,
                "best_val_acc": best_val_acc,
                "best_epoch": best_epoch,
                "train_seconds": train_seconds,
            },
            last_path,
        )

    if epoch == 0:
        tic = time.time()
        record = {"kind": "epoch", "epoch": 0, "train_loss": None, "train_acc": None, **_eval_record(model, data, cfg)}
        record.update(lr=optimizer.param_groups[0]["lr"], seconds=time.time() - tic)
        history.append(record)
        best_val_acc, best_epoch = record["val_acc"], 0
        _save_atomic(model.state_dict(), best_path)
        checkpoint()
        _write_metrics(history, out / "metrics.jsonl")

    epochs_bar = tqdm(range(epoch + 1, cfg.epochs + 1), desc=cfg.model, disable=not cfg.progress, unit="epoch")
    for epoch_now in epochs_bar:
        tic = time.time()
        model.train()
        loss_sum, correct, seen, grad_norms = 0.0, 0, 0, []
        n_steps = math.ceil(len(data.x_train) / cfg.batch_size)
        step_bar = tqdm(
            batches(data.x_train, data.y_train, cfg.batch_size, shuffle=True, generator=generator),
            total=n_steps,
            desc=f"epoch {epoch_now}",
            leave=False,
            disable=not cfg.progress,
        )
        for step, (xb, yb) in enumerate(step_bar, start=1):
            optimizer.zero_grad(set_to_none=True)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            loss.backward()
            loss_value, grad_norm = float(loss.detach()), _grad_norm(model)
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                raise TrainingDiverged(
                    f"training diverged at epoch {epoch_now}, step {step}: loss {loss_value}, gradient norm "
                    f"{grad_norm}; {last_path} (epoch {epoch}) and {best_path} are left untouched"
                )
            optimizer.step()
            grad_norms.append(grad_norm)
            loss_sum += loss_value * len(xb)
            correct += int((logits.argmax(-1) == yb).sum())
            seen += len(xb)
        lr = optimizer.param_groups[0]["lr"]
        if scheduler is not None:
            scheduler.step()
        record = {"kind": "epoch", "epoch": epoch_now, "train_loss": loss_sum / seen, "train_acc": correct / seen}
        record.update(_eval_record(model, data, cfg))
        record.update(
            lr=lr,
            seconds=time.time() - tic,
            grad_norm_stats=_summary(grad_norms),
            grad_norm=[float(f"{g:.5g}") for g in grad_norms],
        )
        epoch = epoch_now
        train_seconds += record["seconds"]
        history.append(record)
        if record["val_acc"] > best_val_acc:
            best_val_acc, best_epoch = record["val_acc"], epoch
            _save_atomic(model.state_dict(), best_path)
        checkpoint()
        _write_metrics(history, out / "metrics.jsonl")
        epochs_bar.set_postfix(val_acc=f"{record['val_acc']:.4f}", loss=f"{record['train_loss']:.4f}")

    model.load_state_dict(torch.load(best_path, map_location=device, weights_only=True))
    test_loss, test_acc = _evaluate(model, data.x_test, data.y_test, cfg.eval_batch_size)
    final = {
        "kind": "final",
        "best_epoch": best_epoch,
        "best_val_acc": best_val_acc,
        "test_loss": test_loss,
        "test_acc": test_acc,
        "epochs_completed": epoch,
        "train_seconds": train_seconds,
        "n_parameters": sum(p.numel() for p in model.parameters()),
    }
    _write_metrics([*history, final], out / "metrics.jsonl")

    finished = time.time()
    session = {
        "command": command or f"organics.train.train({cfg!r})",
        **code_version,
        "device": _device_description(device),
        "started": started_iso,
        "finished": datetime.now(timezone.utc).isoformat(),
        "wall_seconds": finished - started,
    }
    sessions.append(session)
    provenance = {
        **session,
        "config": _config_dict(cfg),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "epochs_completed": epoch,
        "train_seconds": train_seconds,
        "wall_seconds_all_sessions": sum(s["wall_seconds"] for s in sessions),
        "sessions": sessions,
        "result": {k: final[k] for k in ("best_epoch", "best_val_acc", "test_acc", "n_parameters")},
    }
    _write_json_atomic(provenance, out / "provenance.json")
    return RunResults(history, final, provenance)


def load_run(out_dir: str | os.PathLike) -> RunResults:
    """Read a run directory written by :func:`train`: epoch records, final record, provenance.

    Raises
    ------
    FileNotFoundError
        If ``out_dir`` has no ``metrics.jsonl``.
    """
    out = Path(out_dir)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    finals = [r for r in records if r.get("kind") == "final"]
    provenance_path = out / "provenance.json"
    provenance = json.loads(provenance_path.read_text()) if provenance_path.exists() else {}
    return RunResults([r for r in records if r.get("kind") == "epoch"], finals[-1] if finals else None, provenance)


def load_model(out_dir: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The best-validation model of a finished run: built from ``provenance.json``, weights from ``best.pt``.

    The input size is ``image_size**2`` for the static task and 1 (one pixel per step) for
    the sequential ones, as :func:`organics.data.load_mnist` gives. Returned in eval mode.

    Raises
    ------
    FileNotFoundError
        If ``out_dir`` has no ``provenance.json`` (the run has not finished) or no ``best.pt``.
    """
    out = Path(out_dir)
    cfg = json.loads((out / "provenance.json").read_text())["config"]
    in_features = cfg["image_size"] ** 2 if cfg["task"] == "static" else 1
    model = build_model(cfg["model"], in_features=in_features, n_classes=10, **cfg["model_kwargs"])
    model.load_state_dict(torch.load(out / "best.pt", map_location=device, weights_only=True))
    return model.to(device).eval()


def _option_parser(kind: Any) -> tuple[Any, bool]:
    """The argparse ``type`` for a field annotation, and whether ``None`` is allowed."""
    optional = False
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        optional, kind = True, args[0]
    if kind is dict:
        return json.loads, optional
    return kind, optional


def _none_or(parse: Any) -> Any:
    def parse_optional(text: str) -> Any:
        return None if text.lower() == "none" else parse(text)

    parse_optional.__name__ = getattr(parse, "__name__", "value")
    return parse_optional


def build_parser() -> argparse.ArgumentParser:
    """Argument parser with one option per :class:`TrainConfig` field (``--limit-train``, ...)."""
    parser = argparse.ArgumentParser(prog="python -m organics.train", description=__doc__.split("\n\n")[0])
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flags = [f"--{f.name.replace('_', '-')}", *f.metadata.get("aliases", [])]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        parse, optional = _option_parser(hints[f.name])
        if parse is bool:
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=default)
            continue
        help_text = f"default: {json.dumps(default)}" + (" ('none' for None)" if optional else "")
        parser.add_argument(
            *flags, dest=f.name, type=_none_or(parse) if optional else parse, default=default, help=help_text
        )
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from command-line arguments."""
    return TrainConfig(**vars(build_parser().parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: train, then print the final record."""
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_args(argv)
    results = train(cfg, command=" ".join(["python -m organics.train", *argv]))
    print(json.dumps(results.final))


if __name__ == "__main__":
    main()
