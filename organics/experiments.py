"""The paper's named runs: each a full training configuration, defined once.

A :class:`TrainConfig` says everything :func:`organics.train.train` needs; an
:class:`Experiment` gives one configuration a name, a one-line description, the row of the
paper it reproduces (or stands beside), and its run directory under ``results/``. The command
line (``python -m organics.train --experiment NAME``), the chapters, ``book/reproducing.md`` and
the README take their runs from :data:`EXPERIMENTS`::

    from organics.experiments import EXPERIMENTS
    cfg = EXPERIMENTS["static/organics2-identity"].config(epochs=2, limit_train=5000, out_dir="runs/demo")
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ._checks import check_choice, check_count, check_nonnegative, check_positive
from .data import check_image_size, check_task
from .networks import MODELS, SEQUENCE_MODELS

__all__ = ["BAR_MARGIN", "EXPERIMENTS", "Experiment", "TrainConfig", "experiment_table"]


@dataclass
class TrainConfig:
    """Configuration of one training run (each field is also a command-line option).

    Attributes
    ----------
    task : {"static", "sequential", "permuted"}
        Data from :func:`organics.data.load_mnist`.
    model : str
        A name in :data:`organics.networks.MODELS` (e.g. ``"organics2"``, ``"mlp"``).
    model_kwargs : dict
        Keyword arguments of the model (JSON on the command line).
    epochs, batch_size, lr, weight_decay : int, int, float, float
        Training schedule: Adam (``torch.optim.Adam``, whose ``weight_decay`` adds
        ``weight_decay * theta`` to the gradient).
    step_size, gamma : int or None, float
        StepLR: multiply the learning rate by ``gamma`` every ``step_size`` epochs (None: constant).
    seed : int
        Seeds python, numpy, torch (model initialisation) and the batch order.
    device : {"auto", "cpu", "cuda"}
        ``"auto"`` picks CUDA when available.
    tf32 : bool
        On CUDA, let float32 matrix products (cuBLAS, cuDNN and the persistent scan's ``tl.dot``)
        use TF32 tensor cores, as the authors' A100 runs did; recorded per working session.
    out_dir : str
        Run directory (:class:`organics.runs.RunDirectory`).
    limit_train, limit_test, image_size, n_val, split_seed, permutation_seed, data_root
        Passed to :func:`organics.data.load_mnist` (limits and ``image_size < 28`` are for
        quick runs; ``image_size`` must divide 28).
    eval_batch_size : int
        Batch size for evaluation.
    monitor : bool
        Log, every epoch, the largest real part of the circuit Jacobian's eigenvalues at each
        layer's fixed point over the first ``monitor_samples`` test inputs (the model needs a
        ``fixed_points`` method, see :func:`organics.networks.stability.layer_stability`).
    monitor_samples, monitor_iterations : int
        Test inputs monitored; Algorithm 1 iterations used to refine their fixed points.
    resume : bool
        Continue from ``out_dir/last.pt`` if it exists.
    progress : bool
        Show tqdm progress bars.

    Raises
    ------
    ValueError
        Naming the field, when a value is out of range or unknown.
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
    tf32: bool = False
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
        check_task(self.task)
        check_choice("model", self.model, sorted(MODELS))
        if (self.model in SEQUENCE_MODELS) != (self.task != "static"):
            wanted = "one of " + str(sorted(SEQUENCE_MODELS)) if self.task != "static" else "a model of static images"
            raise ValueError(f"model {self.model!r} does not read task {self.task!r}'s inputs: it needs {wanted}")
        if not isinstance(self.model_kwargs, dict):
            raise ValueError(f"model_kwargs must be a dict (a JSON object), got {type(self.model_kwargs).__name__}")
        check_image_size(self.image_size)
        for name in ("epochs", "batch_size", "eval_batch_size", "monitor_samples"):
            check_count(name, getattr(self, name))
        for name in ("limit_train", "limit_test", "step_size"):
            check_count(name, getattr(self, name), optional=True)
        for name in ("monitor_iterations", "seed", "split_seed", "permutation_seed"):
            check_count(name, getattr(self, name), 0)
        check_count("n_val", self.n_val, 1, 59_999)
        check_positive("lr", self.lr)
        check_nonnegative("weight_decay", self.weight_decay)
        check_positive("gamma", self.gamma)
        check_choice("device", self.device, ("auto", "cpu", "cuda"))

    def asdict(self) -> dict:
        """The fields as a plain dict (JSON-serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def completed(cls, saved: dict) -> dict:
        """A saved configuration with every current field: one added after it was saved takes its default.

        That default is what the saved run did, since the field did not exist then.
        """
        return {**cls().asdict(), **saved}


BAR_MARGIN = 0.5
"""Points of test accuracy by which a reproduction may fall short of the paper's value (spec section 4)."""


@dataclass(frozen=True)
class Experiment:
    """A named training run.

    Attributes
    ----------
    name : str
        ``"<benchmark>/<model>"``, e.g. ``"static/mlp"``.
    description : str
        One line: what is trained and how.
    paper : str
        The row of the paper's tables it reproduces, or what it stands beside.
    settings : Mapping
        The :class:`TrainConfig` fields that differ from their defaults (``out_dir`` excluded).
    out_dir : str
        Run directory of the full-scale run, relative to the repository root.
    paper_accuracy : float, optional
        Test accuracy (%) the paper reports for the row (spec section 4), if any.
    authors_accuracy : float, optional
        Final-epoch test accuracy (%) of the authors' own stored run of the row, if one exists.
    """

    name: str
    description: str
    paper: str
    settings: Mapping[str, Any]
    out_dir: str
    paper_accuracy: float | None = None
    authors_accuracy: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "settings", MappingProxyType(copy.deepcopy(dict(self.settings))))

    @property
    def bar(self) -> float | None:
        """Test accuracy (%) at which our run reproduces the row, the paper's minus :data:`BAR_MARGIN` (or None)."""
        return None if self.paper_accuracy is None else self.paper_accuracy - BAR_MARGIN

    def config(self, **overrides: Any) -> TrainConfig:
        """The full configuration, with ``overrides`` (e.g. quick-run limits or another ``out_dir``) applied."""
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(TrainConfig)})
        if unknown:
            raise ValueError(f"overrides must be TrainConfig fields, got unknown {unknown}")
        return TrainConfig(**{"out_dir": self.out_dir, **copy.deepcopy(dict(self.settings)), **overrides})

    def command(self, *, resume: bool = True) -> str:
        """The command line that runs (``resume``: or continues) the full-scale run."""
        return f"python -m organics.train --experiment {self.name}" + (" --resume" if resume else "")


def _experiments(*experiments: Experiment) -> Mapping[str, Experiment]:
    for e in experiments:
        e.config()  # every preset must be a valid configuration
    return MappingProxyType({e.name: e for e in experiments})


_SEQUENTIAL_PROTOCOL = dict(epochs=300, batch_size=256, lr=0.01, step_size=30, gamma=0.8)
"""Adam 0.01 (weight decay 1e-5), StepLR (30 epochs, 0.8), 300 epochs, batch 256: the paper's sequential protocol."""

_AUTHORS_SEED = dict(seed=73, split_seed=73, permutation_seed=73)
"""The seed of the authors' runs, for initialisation, batch order, split and pixel permutation."""

_BENCHMARKS = {"smnist": "sequential", "psmnist": "permuted"}

_TABLE_2 = {  # (benchmark, units, fixed time constants) -> the paper's accuracy (%)
    ("smnist", 64, True): 90.3,
    ("psmnist", 64, True): 80.3,
    ("smnist", 128, True): 94.8,
    ("psmnist", 128, True): 84.8,
    ("smnist", 64, False): 97.7,
    ("psmnist", 64, False): 89.9,
    ("smnist", 128, False): 97.8,
    ("psmnist", 128, False): 90.7,
}


def _table_2_organics(bench: str, n: int, fixed: bool) -> Experiment:
    label = f"organics-fixed-{n}" if fixed else f"organics-{n}"
    kind = "fixed time constants" if fixed else "learned time constants"
    model_kwargs = {"hidden_size": n, "preset": "paper", **({"step_sizes": "fixed"} if fixed else {})}
    return Experiment(
        f"{bench}/{label}",
        f"paper-era ORGaNICs RNN ({n} units, {kind}) on {bench}: rectified, W_r = I + SN(V), signed drive, "
        "sigma = 1; Adam 0.01, StepLR 30/0.8, 300 epochs, batch 256, no clipping, seed 73",
        f"Table 2, ORGaNICs{', fixed time constants' if fixed else ''} ({n} units), {bench}",
        dict(
            task=_BENCHMARKS[bench],
            model="organics_rnn",
            model_kwargs=model_kwargs,
            **_SEQUENTIAL_PROTOCOL,
            **_AUTHORS_SEED,
        ),
        f"results/sequential/{bench}_{label}",
        paper_accuracy=_TABLE_2[bench, n, fixed],
        authors_accuracy=94.5 if (bench, n, fixed) == ("smnist", 128, False) else None,
    )


def _table_2_lstm(bench: str) -> Experiment:
    return Experiment(
        f"{bench}/lstm-128",
        f"LSTM (128 units) on {bench}, the paper's protocol: Adam 0.01, StepLR 30/0.8, 300 epochs, batch 256, "
        "no clipping, seed 73",
        f"Table 2, LSTM (128 units, cited by the paper), {bench}",
        dict(task=_BENCHMARKS[bench], model="lstm", model_kwargs={"hidden_size": 128})
        | _SEQUENTIAL_PROTOCOL
        | _AUTHORS_SEED,
        f"results/sequential/{bench}_lstm",
        paper_accuracy={"smnist": 97.3, "psmnist": 92.6}[bench],
    )


def _first_cell(bench: str) -> Experiment:
    """This package's first sequential ORGaNICs runs (seed 0), kept under their names."""
    return Experiment(
        f"{bench}/organics-orthogonal-128",
        f"ORGaNICs RNN, first cell: main model, free W_r (orthogonal init), relu drive (128 units) on {bench}, "
        "Adam 0.01, StepLR 30/0.8, 300 epochs, batch 256, no clipping",
        "beside Table 2: this package's first cell, not the paper-era one",
        dict(task=_BENCHMARKS[bench], model="organics_rnn", model_kwargs={"hidden_size": 128}) | _SEQUENTIAL_PROTOCOL,
        f"results/sequential/{bench}_organics",
    )


_STATIC_PROTOCOL = dict(task="static", epochs=200, batch_size=256, lr=1e-3, step_size=100, gamma=0.8, monitor=True)
"""Adam 1e-3 (weight decay 1e-5), StepLR (100 epochs, 0.8), 200 epochs, batch 256: the paper's static protocol."""


def _table_1_organics(label: str, hidden_sizes: list[int], row: str, paper: float, authors: float | None) -> Experiment:
    model_kwargs = {"hidden_sizes": hidden_sizes, "preset": "paper", "front_end": "autoencoder"}
    return Experiment(
        f"static/{label}",
        f"paper-era ORGaNICs ({'/'.join(map(str, hidden_sizes))} units) on the 40-dim code of a 784-360-120-40 "
        "autoencoder (reconstruction loss added), W_r = V/sigma_max(V) learned, sigma = 1, output relu(y)^2, "
        "implicit gradient; Adam 1e-3, StepLR 100/0.8, 200 epochs, seed 73",
        f"Table 1, {row}",
        dict(model="organics2", model_kwargs=model_kwargs) | _STATIC_PROTOCOL | _AUTHORS_SEED,
        f"results/static_mnist/{label}",
        paper_accuracy=paper,
        authors_accuracy=authors,
    )


def _table_1_ssn(excitatory: int, inhibitory: int, paper: float) -> Experiment:
    label = f"ssn-{excitatory}-{inhibitory}"
    return Experiment(
        f"static/{label}",
        f"SSN ({excitatory} E + {inhibitory} I units, Dale's law, rates k[Wr + h]_+^2, steady state by Euler "
        "simulation, implicit gradient, failures counted) on the 40-dim code of the ORGaNICs rows' autoencoder "
        "(reconstruction loss added); Adam 1e-3, StepLR 100/0.8, 200 epochs, seed 73",
        f"Table 1, SSN ({excitatory}:{inhibitory}), quoted by the paper from Soo & Lengyel (NeurIPS 2022); "
        "retrained here with the ORGaNICs rows' front end and protocol",
        dict(model="ssn", model_kwargs={"excitatory": excitatory, "inhibitory": inhibitory, "front_end": "autoencoder"})
        | _STATIC_PROTOCOL
        | _AUTHORS_SEED
        | dict(monitor=False),  # the Jacobian monitor is the ORGaNICs circuit's; the SSN logs its failures instead
        f"results/static_mnist/{label}",
        paper_accuracy=paper,
    )


EXPERIMENTS: Mapping[str, Experiment] = _experiments(
    Experiment(
        "static/organics2-identity",
        "two ORGaNICs layers (128, 64) with W_r = I on raw pixels, closed-form fixed point, 40 epochs",
        "Table 1, ORGaNICs (two layers): a simpler variant (no autoencoder, W_r = I, not learned)",
        dict(task="static", model="organics2", model_kwargs={"recurrence": "identity"}, epochs=40, monitor=True),
        "results/static_mnist/organics2",
    ),
    _table_1_organics("organics-50", [50], "ORGaNICs (50:50)", 98.1, None),
    _table_1_organics("organics-80", [80], "ORGaNICs (80:80)", 98.2, None),
    _table_1_organics("organics2-120-60", [120, 60], "ORGaNICs (two layers)", 98.1, 98.05),
    _table_1_ssn(50, 50, 94.9),
    _table_1_ssn(80, 20, 95.2),
    Experiment(
        "static/mlp",
        "MLP 784-300-100-10 (ReLU), same trainer and split, 40 epochs",
        "baseline beside Table 1 (not in the paper)",
        dict(task="static", model="mlp", epochs=40),
        "results/static_mnist/mlp",
    ),
    *(_table_2_organics(bench, n, fixed) for bench in _BENCHMARKS for fixed in (False, True) for n in (128, 64)),
    *(_table_2_lstm(bench) for bench in _BENCHMARKS),
    *(_first_cell(bench) for bench in _BENCHMARKS),
    *(
        Experiment(
            f"smnist-10k/{label}",
            f"CPU evidence: {what} on 10,000 sMNIST training images at full length (784 steps), 5 epochs, "
            "Adam 0.01, batch 256, seed 73",
            "beside Table 2: does the cell learn at all on a CPU budget (gradient norms, Jacobian along the sequence)",
            dict(task="sequential", model=model, model_kwargs=kwargs, epochs=5, limit_train=10_000, lr=0.01)
            | _AUTHORS_SEED,
            f"results/sequential_10k/{label}",
        )
        for label, model, kwargs, what in (
            ("organics-paper-128", "organics_rnn", {"hidden_size": 128, "preset": "paper"}, "paper-era ORGaNICs"),
            ("organics-orthogonal-128", "organics_rnn", {"hidden_size": 128}, "first-cell ORGaNICs"),
            ("lstm-128", "lstm", {"hidden_size": 128}, "LSTM"),
        )
    ),
)
"""The named runs, by name."""


def experiment_table() -> str:
    """Plain-text list of :data:`EXPERIMENTS`: name, description, paper row and run directory."""
    lines = []
    for e in EXPERIMENTS.values():
        lines += [e.name, f"    {e.description}", f"    paper: {e.paper}", f"    results: {e.out_dir}"]
    return "\n".join(lines)
