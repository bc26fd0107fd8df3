"""Time whole training epochs of the paper-era Table 1 models on the CPU: learned W_r against W_r = I.

Each epoch is the trainer's own (:class:`organics.train.Trainer`: the training pass over the
57,000 training images in batches of 256, then the evaluation of the validation and test sets),
run with one torch thread; its record's ``seconds`` is what is reported. Per Table 1 row:

- ``trained``: the learned-W_r model continues a copy of the committed full-scale run
  (``results/static_mnist/<run>/last.pt``) for one more epoch, at its trained weights;
- ``untrained``: the learned-W_r model's first epoch, from its initialisation;
- ``identity``: the same model with ``recurrence="identity"`` (W_r = I, the closed-form fixed
  point), first epoch.

The ratios to the ``identity`` epoch are issue 14's measure (goal: at most 2). Writes
``results/benchmarks/static_training_epoch_cpu.json``; keep the BLAS that numba calls to one
thread too::

    OPENBLAS_NUM_THREADS=1 python benchmarks/static_epoch.py
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

from organics.benchmark import machine, write_record
from organics.experiments import EXPERIMENTS
from organics.train import train

ROWS = ("static/organics-50", "static/organics-80", "static/organics2-120-60")
"""The experiments of Table 1's ORGaNICs rows."""


def epoch_seconds(experiment: str, variant: str, scratch: Path) -> dict:
    """Train one epoch of ``experiment`` as ``variant`` ("trained", "untrained" or "identity") in ``scratch``."""
    exp = EXPERIMENTS[experiment]
    out = scratch / experiment.replace("/", "_") / variant
    settings = dict(out_dir=str(out), device="cpu", progress=False)
    if variant == "trained":
        out.mkdir(parents=True)
        for name in ("last.pt", "best.pt", "metrics.jsonl", "provenance.json"):
            shutil.copy(Path(exp.out_dir) / name, out / name)
        done = json.loads((out / "provenance.json").read_text())["epochs_completed"]
        cfg = exp.config(**settings, epochs=done + 1, resume=True)
    else:
        model_kwargs = exp.config().model_kwargs | ({"recurrence": "identity"} if variant == "identity" else {})
        cfg = exp.config(**settings, epochs=1, model_kwargs=model_kwargs)
    record = train(cfg).epochs[-1]
    return {"epoch": record["epoch"], "seconds": record["seconds"], "test_acc": record["test_acc"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/benchmarks/static_training_epoch_cpu.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for experiment in ROWS:
            row = {
                variant: epoch_seconds(experiment, variant, Path(scratch))
                for variant in ("identity", "untrained", "trained")
            }
            for variant in ("untrained", "trained"):
                row[variant]["ratio_to_identity"] = row[variant]["seconds"] / row["identity"]["seconds"]
            results[experiment] = row
            print(experiment, {v: f"{r['seconds']:.1f} s" for v, r in row.items()}, flush=True)
    record = {
        "date": datetime.now(timezone.utc).isoformat(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine("cpu"),
        "results": results,
    }
    write_record(record, args.out)
    return record


if __name__ == "__main__":
    main()
