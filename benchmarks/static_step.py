"""Time one training step of static ORGaNICs models: W_r = I against learned W_r (implicit and unrolled gradients).

Each model (built with :func:`organics.networks.build_model`) does forward, cross-entropy plus
its auxiliary loss, backward and an Adam step on the same batch of MNIST training images,
interleaved with the others, repeat after repeat; the script reports the median seconds per
step, the epoch they imply (223 steps of 256 images), the ratio to the same model with
W_r = I (issue 14's goal: at most 2), and how the implicit solves went (iterations, the
iteration that converged, adjoint iterations, the engine that ran the sweeps), and writes them
to JSON. The trained models are timed twice: with the compiled loop (engine "numba", the
default on the CPU) and with the readable one (engine "torch"). With one torch thread, keep
the BLAS that numba calls to one thread as well::

    OPENBLAS_NUM_THREADS=1 python benchmarks/static_step.py --repeats 15 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from organics.benchmark import machine, write_record
from organics.data import load_mnist
from organics.networks import build_model
from organics.runs import load_model, summarize_run
from organics.train import training_settings

MODELS = {
    "identity (W_r = I, 128/64)": dict(hidden_sizes=[128, 64], recurrence="identity"),
    "learned, implicit (128/64)": dict(hidden_sizes=[128, 64], gradient="implicit"),
    "learned, unrolled 15 (128/64)": dict(hidden_sizes=[128, 64], gradient="unrolled"),
    "paper, autoencoder + 50, W_r = I": dict(
        hidden_sizes=[50], preset="paper", front_end="autoencoder", recurrence="identity"
    ),
    "paper, autoencoder + 50": dict(hidden_sizes=[50], preset="paper", front_end="autoencoder"),
    "paper, autoencoder + 80, W_r = I": dict(
        hidden_sizes=[80], preset="paper", front_end="autoencoder", recurrence="identity"
    ),
    "paper, autoencoder + 80": dict(hidden_sizes=[80], preset="paper", front_end="autoencoder"),
    "paper, autoencoder + 120/60, W_r = I": dict(
        hidden_sizes=[120, 60], preset="paper", front_end="autoencoder", recurrence="identity"
    ),
    "paper, autoencoder + 120/60": dict(hidden_sizes=[120, 60], preset="paper", front_end="autoencoder"),
}
"""The models timed; each learned-W_r model is compared with the W_r = I model of the same shape (:data:`BASELINE`)."""

BASELINE = {
    "learned, implicit (128/64)": "identity (W_r = I, 128/64)",
    "learned, unrolled 15 (128/64)": "identity (W_r = I, 128/64)",
    "paper, autoencoder + 50": "paper, autoencoder + 50, W_r = I",
    "paper, autoencoder + 80": "paper, autoencoder + 80, W_r = I",
    "paper, autoencoder + 120/60": "paper, autoencoder + 120/60, W_r = I",
    "paper, autoencoder + 50, trained": "paper, autoencoder + 50, W_r = I",
    "paper, autoencoder + 80, trained": "paper, autoencoder + 80, W_r = I",
    "paper, autoencoder + 120/60, trained": "paper, autoencoder + 120/60, W_r = I",
}
BASELINE |= {f"{name}, torch loop": identity for name, identity in BASELINE.items() if name.endswith("trained")}

TRAINED = {
    "paper, autoencoder + 50, trained": "results/static_mnist/organics-50",
    "paper, autoencoder + 80, trained": "results/static_mnist/organics-80",
    "paper, autoencoder + 120/60, trained": "results/static_mnist/organics2-120-60",
}
"""Models timed with the weights of a committed run's best model (where the run has one): the fixed-point
iterations of trained layers take longer than at initialisation, where W_r = I. Each is timed again as
``"<name>, torch loop"`` with its layers' ``engine="torch"``."""


def with_engine(model: torch.nn.Module, engine: str) -> torch.nn.Module:
    """``model`` with every circuit layer's implicit solve run by ``engine`` (``LayerOptions.engine``)."""
    for layer in model.layers:
        layer.options = replace(layer.options, engine=engine)
    return model


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    tic = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    if getattr(model, "auxiliary_loss", None) is not None:
        loss = loss + model.auxiliary_loss
    loss.backward()
    optimizer.step()
    return time.perf_counter() - tic


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="results/benchmarks/static_training_step_cpu.json")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    data = load_mnist(limit_train=256)
    x, y = data.x_train[:256], data.y_train[:256]
    torch.manual_seed(0)
    models = {name: build_model("organics2", 784, 10, **kwargs) for name, kwargs in MODELS.items()}
    trained = {name: folder for name, folder in TRAINED.items() if (Path(folder) / "best.pt").exists()}
    models |= {name: load_model(folder).train() for name, folder in trained.items()}
    models |= {f"{name}, torch loop": with_engine(load_model(f).train(), "torch") for name, f in trained.items()}
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=1e-3) for name, m in models.items()}
    times = {name: [] for name in models}
    iterations = {name: [] for name in models}
    with training_settings():  # as the trainer computes (organics.train.training_settings)
        for name in models:  # warm-up
            step(models[name], optimizers[name], x, y)
        for _ in range(args.repeats):
            for name, model in models.items():
                times[name].append(step(model, optimizers[name], x, y))
                solves = [layer.last_solve for layer in model.layers if layer.last_solve is not None]
                iterations[name].append(
                    [
                        {
                            "iterations": s.iterations,
                            "method": s.method,
                            "adjoint_iterations": s.adjoint_iterations,
                            "engine": s.engine,
                        }
                        for s in solves
                    ]
                )
    median = {name: statistics.median(ts) for name, ts in times.items()}
    rows = {
        name: {
            "median_step_seconds": median[name],
            "epoch_seconds_implied": 223 * median[name],
            "ratio_to_identity": median[name] / median[BASELINE.get(name, name)],
            "solves_per_layer": iterations[name][-1],
            "all": ts,
        }
        for name, ts in times.items()
    }
    for name, row in rows.items():
        print(f"{name}: {row['median_step_seconds']:.3f} s/step, x{row['ratio_to_identity']:.2f} of W_r = I, "
              f"solves {row['solves_per_layer']}")  # fmt: skip
    record = {
        "date": datetime.now(timezone.utc).isoformat(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine("cpu"),
        "batch": 256,
        "models": {name: MODELS[name] for name in MODELS}
        | {
            name + suffix: {"best model of": folder, "epoch": summarize_run(folder).best_epoch, "engine": engine}
            for name, folder in trained.items()
            for suffix, engine in (("", "auto"), (", torch loop", "torch"))
        },
        "results": rows,
    }
    write_record(record, args.out)
    return record


if __name__ == "__main__":
    main()
