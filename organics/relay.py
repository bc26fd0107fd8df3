"""The GPU relay: make the most of a short, rare GPU window in one prepared command.

A window is about 15 minutes on a remote GPU that receives a copy of the working tree, runs one
command of at most 10 minutes and returns at most 8 files. ``python -m organics.relay run``
does everything such a window is for, in this order, each step bounded in time (MNIST is
verified first: without its data a window stops at once instead of after its checks and timings):

1. **Check** the scan's engines on the GPU against the float64 step loop (values and every
   gradient of two small paper-era models of each Table 2 size run side by side, as training
   runs them), in the order ``"resident"``, ``"persistent"``, ``"triton"``, ``"torch"``; an engine that fails is
   reported and left out, as is one whose training step at the timing's full shape raises.
2. **Time** (on a GPU, after recording what the resident kernels use and issue per step as the
   machine's Triton compiles them: ``kernel_resources``) one training step (batch 256, T 784,
   n 128, paper-era cell) of each engine that passed, alone and with four runs side by side,
   and of cuDNN's LSTM, interleaved; then a whole synthetic epoch (223 steps of 256, the 57,000
   training sequences, with Adam) of each single run predicted under :data:`EPOCH_LIMIT`
   seconds (not in a dry run); the engine fastest with four runs side by side trains. Write
   ``rnn_training_step_<device>.json`` with the ratios to the LSTM. Timing and training run
   with TF32 products allowed (``--tf32``, the default; the authors' A100 runs used TF32, and
   cuDNN's LSTM uses it by default), the engine check without. The ``"resident"`` engine's
   products are always half precision with per-row scaling (11 significant bits, as TF32's);
   the engine that trained is recorded in every run's provenance.
3. **Train** every unfinished run of :data:`RELAY_EXPERIMENTS` (Table 2: eight ORGaNICs rows and
   the two LSTMs; a finished run is neither loaded nor touched), each resumed from its
   ``last.pt``, all together in one process: one epoch of each at a time, their steps
   interleaved (:func:`organics.train.train_together`), the
   ORGaNICs RNNs of one hidden size in one kernel launch per direction
   (:func:`organics.networks.rnn.classify_together`), each launch and each LSTM on a CUDA stream
   of its own if that agrees with one stream and is faster (``_side_streams``), saving every
   epoch; a few steps of the first epoch are profiled (wall, kernel and host time per step, the
   costliest kernels: in the log and ``relay.json``). When the time budget
   leaves no room for an epoch of every run, the runs with the most epochs sit the epoch out. If
   training raises, the next engine resumes every run from its last saved epoch.
4. **Pack** what must come back into ``relay.tar.gz`` (the folders of the runs this window
   trained: metrics, provenance, ``best.pt``, ``last.pt``, and ``diverged.pt`` where one
   diverged; the benchmark) beside ``relay.json``
   (checks, timings, epochs per minute) and ``relay.log``: three files. This step runs even
   when the relay stops early, on an error or on SIGTERM (``timeout`` ending the command:
   :class:`Terminated`): every saved epoch goes back.

A later call in the same window (the machine still warm, the tree's runs advanced by the first
call's unpacked results) can skip step 2 with ``--no-timing``: the engines that pass their check
and one training step at the full shape are then tried in the order of that step's time.

``python -m organics.relay unpack OUT`` (here, after the window) puts the runs back under
``results/`` and stamps the window's sessions with the commit the relay ran (the GPU copy of
the tree may carry no git history, or a stale one). It refuses, changing nothing, when a run
here has a session the window's copy lacks (trained on the CPU meanwhile, or a later window
already unpacked): the two histories fork, and one must be chosen (``--force`` takes the
window's). ``--dry-run`` runs all four steps on the CPU at tiny sizes, in a
scratch results folder removed once its runs are packed: the test suite runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import shutil
import signal
import sys
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .benchmark import benchmark, machine, write_record
from .data import DataIntegrityError, MNISTSplits, file_sha256, load_mnist
from .experiments import EXPERIMENTS, TrainConfig
from .networks import ORGaNICsRNN
from .networks.rnn import classify_together
from .networks.scan import organics_scan_runs, persistent_kernel_resources
from .runs import RunDirectory, RunInUseError, _replace_atomic, finished_run
from .train import Trainer, _OneLineParser, train_together

__all__ = [
    "EPOCH_LIMIT",
    "RELAY_EXPERIMENTS",
    "WINDOWS",
    "EngineCheck",
    "ForkedHistoryError",
    "Terminated",
    "check_engines",
    "main",
    "run",
    "unpack",
]

RELAY_EXPERIMENTS = tuple(
    [name for name in EXPERIMENTS if EXPERIMENTS[name].settings["model"] == "organics_rnn" and "-10k" not in name
     and "orthogonal" not in name]
    + ["smnist/lstm-128", "psmnist/lstm-128"]
)  # fmt: skip
"""The runs the relay advances (every ORGaNICs row of Table 2 and the LSTM on both tasks)."""

ENGINES = ("resident", "persistent", "triton", "torch")
"""Engines in the order the relay tries them."""

EPOCH_LIMIT = 15.0
"""The relay times a whole epoch of each single run whose epoch it predicts shorter than this many seconds (on an
H100 the resident and persistent engines and the LSTM, not the triton engine's 35 s or the torch engine's minutes)."""

WINDOWS = "gpu_windows"
"""Folder under ``results/benchmarks`` with the benchmark of every GPU window (:func:`unpack`)."""

CHECK_HIDDEN_SIZES = (64, 128)
"""Hidden sizes of the engine check: those of Table 2, so that an engine that cannot run one fails the check."""

CHECK_TOLERANCES = {"resident": 2e-3, "persistent": 1e-3, "triton": 1e-3, "torch": 1e-3}
"""The largest relative error of the engine check that passes, per engine.

Float32 accumulation over the check's 100 steps; the resident engine's products are half
precision (unit roundoff 4.9e-4), and under the Triton interpreter its largest error at n = 128
was 9.8e-4 with the kernels the windows of 2026-11-27 ran and 8.9e-4 with those of 2026-11-28
(``cell.p_a``'s gradient): a tolerance of 1e-3 left it a margin of a tenth. A faulty kernel
errs by far more.
"""

DRY_RUN = dict(epochs=2, limit_train=64, limit_test=32, image_size=7, batch_size=32, eval_batch_size=64)
"""What ``--dry-run`` changes in every run's configuration (with hidden size 8)."""


@dataclass(frozen=True)
class EngineCheck:
    """An engine's largest errors against the float64 loop, relative to each output's largest entry."""

    engine: str
    passed: bool
    max_error: float
    detail: str


def _outputs(models: list[ORGaNICsRNN], xs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Final y of each model on its input and every gradient of the sum of their y^2, the models run together."""
    for model in models:
        model.zero_grad(set_to_none=True)
    ys = organics_scan_runs([m.cell for m in models], xs, engine=models[0].engine)
    sum(y.square().sum() for y in ys).backward()
    out = {}
    for i, (model, y) in enumerate(zip(models, ys, strict=True)):
        out[f"run {i}: y"] = y.detach()
        out |= {f"run {i}: {name}": p.grad for name, p in model.named_parameters() if p.grad is not None}
    return out


def check_engines(
    device: torch.device,
    engines: tuple[str, ...] = ENGINES,
    tolerances: dict[str, float] | None = None,
    hidden_sizes: tuple[int, ...] = CHECK_HIDDEN_SIZES,
) -> list[EngineCheck]:
    """Compare each engine (float32 on ``device``) with the float64 loop on the CPU: small paper-era models.

    Batch 8, T 100, n 64 and 128 (``hidden_sizes``, by default Table 2's: an H100 window showed
    the persistent engine correct at n 32 and out of shared memory at n 128), paper-era cell with
    perturbed parameters, two such models of each size (run side by side: in one launch with the
    persistent engine, as the relay trains them); the error of each output and gradient is
    ``max |engine - loop| / max |loop|``; an engine passes when all are below its tolerance
    (``tolerances``, by default ``CHECK_TOLERANCES``) at every size (TF32 is not enabled).
    An engine that raises fails.
    """
    xs = [torch.rand(8, 100, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    references, expected = {}, {}
    for n in hidden_sizes:
        references[n] = []
        for seed in range(2):
            torch.manual_seed(seed)
            reference = ORGaNICsRNN(1, n, 10, preset="paper", impl="loop").double()
            with torch.no_grad():
                for p in reference.parameters():
                    p.add_(0.1 * torch.randn_like(p))
            references[n].append(reference)
        for i, (reference, x) in enumerate(zip(references[n], xs, strict=True)):  # the readable loop, one at a time
            reference.zero_grad(set_to_none=True)
            y, _ = reference.run(x)
            y.square().sum().backward()
            expected[f"n {n}, run {i}: y"] = y.detach()
            expected |= {
                f"n {n}, run {i}: {name}": p.grad for name, p in reference.named_parameters() if p.grad is not None
            }
    checks = []
    for engine in engines:
        actual = {}
        try:
            for n in hidden_sizes:
                models = []
                for reference in references[n]:
                    model = ORGaNICsRNN(1, n, 10, preset="paper", impl="scan", engine=engine)
                    model.load_state_dict(reference.state_dict())
                    models.append(model.to(device=device, dtype=torch.float32))
                outputs = _outputs(models, [x.to(device=device, dtype=torch.float32) for x in xs])
                actual |= {f"n {n}, {key}": value for key, value in outputs.items()}
            errors = {k: float((actual[k].double().cpu() - v).abs().max() / v.abs().max()) for k, v in expected.items()}
        except Exception as err:  # any failure of a compiled kernel means: fall back to the next engine
            checks.append(EngineCheck(engine, False, float("inf"), f"{type(err).__name__}: {err}"))
            continue
        worst = max(errors, key=errors.get)
        passed = errors[worst] < (tolerances or CHECK_TOLERANCES)[engine]
        checks.append(EngineCheck(engine, passed, errors[worst], f"largest error in {worst}"))
    return checks


def _runs_at_scale(engine: str, device: torch.device, batch: int, T: int, hidden_size: int) -> tuple[str | None, float]:
    """Whether ``engine`` trains at the given shape: (None, seconds of its second step) or (what it raised, inf).

    Two forward and backward passes of one model, the second timed (the first compiles).
    """
    try:
        model = ORGaNICsRNN(1, hidden_size, 10, preset="paper", impl="scan", engine=engine).to(device)
        x = torch.rand(batch, T, 1, device=device)
        for _ in range(2):
            tic = time.perf_counter()
            model(x).square().sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
    except Exception as err:  # a kernel that checks at batch 8 may still fail at batch 256 (launch size, memory)
        return f"{type(err).__name__}: {err}".splitlines()[0], float("inf")
    return None, time.perf_counter() - tic


STREAMS_TOLERANCE = 1e-6
"""Largest relative difference between a step with side streams and without that the relay accepts (or ten times
the difference between two steps without, if larger: cuDNN's backward need not be deterministic)."""


def _side_streams(models: list[torch.nn.Module], xs: list[torch.Tensor], labels: list[torch.Tensor]) -> dict:
    """Whether the runs train on CUDA streams of their own (``classify_together(streams=True)``): checked and timed.

    One training step of every run together (forward, the sum of the cross-entropies, backward;
    no optimizer step: the runs are left as they were) on its first batch, without side streams
    twice and with them once: the largest relative difference of a logit or a gradient, with
    streams and between the two steps without (what the device does differently from one step
    to the next), then three steps each way, interleaved. Side streams are used when they agree
    (:data:`STREAMS_TOLERANCE`) and are faster. On the CPU there is nothing to decide.
    """
    if not xs:
        return {"used": False, "detail": "no run to train"}
    if not xs[0].is_cuda:
        return {"used": False, "detail": f"no CUDA streams on the {xs[0].device.type}"}

    def step(streams: bool) -> list[torch.Tensor]:
        for model in models:
            model.zero_grad(set_to_none=True)
        logits = classify_together(models, xs, streams=streams)
        sum(F.cross_entropy(z, y) for z, y in zip(logits, labels, strict=True)).backward()
        torch.cuda.synchronize()
        grads = [p.grad for model in models for p in model.parameters() if p.grad is not None]
        return [t.detach().clone() for t in (*logits, *grads)]

    def difference(got: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
        pairs = zip(got, expected, strict=True)
        return max(float((g - e).abs().max() / e.abs().max().clamp_min(1e-30)) for g, e in pairs)

    try:
        plain = step(False)
        noise, error = difference(step(False), plain), difference(step(True), plain)
        seconds: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(3):
            for streams in (False, True):
                tic = time.perf_counter()
                step(streams)
                seconds[streams].append(time.perf_counter() - tic)
    except Exception as err:  # a diagnosis: training goes on without side streams
        return {"used": False, "detail": f"failed ({type(err).__name__}: {err})".splitlines()[0]}
    finally:
        for model in models:
            model.zero_grad(set_to_none=True)
    median = {streams: sorted(ts)[1] for streams, ts in seconds.items()}
    agree = error <= max(STREAMS_TOLERANCE, 10 * noise)
    return {
        "used": agree and median[True] < median[False],
        "detail": "agree" if agree else "DISAGREE",
        "max_relative_difference": error,
        "between_steps_without": noise,
        "step_seconds": {"one stream": median[False], "side streams": median[True]},
    }


PROFILED_STEPS = 10
"""Training steps of the first epoch (all runs together) that the relay profiles, after two others."""


class _StepProfile:
    """The torch profiler over a few training steps: wall, kernel and host time per step, and the top kernels.

    Used as ``on_step`` of :func:`organics.train.train_together` for the first epoch; it adds no
    synchronisation of its own. A failure of the profiler is logged, never raised: the profile is
    a diagnosis, the training what the window is for.
    """

    def __init__(self, device: torch.device, steps_in_epoch: int, log: Callable) -> None:
        from torch.profiler import ProfilerActivity, profile, schedule

        self.active = max(1, min(PROFILED_STEPS, steps_in_epoch - 3))
        self.wait = min(2, max(0, steps_in_epoch - self.active - 1))
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self.log, self.marks, self.summary = log, [], None
        try:
            self.profiler = profile(
                activities=activities, schedule=schedule(wait=self.wait, warmup=1, active=self.active, repeat=1)
            )
            self.profiler.__enter__()
        except Exception as err:  # a diagnosis only: train unprofiled
            self.profiler = None
            log(f"profiler did not start ({type(err).__name__}: {err})".splitlines()[0])

    def step(self) -> None:
        self.marks.append(time.perf_counter())
        if self.profiler is not None:
            self.profiler.step()

    def finish(self) -> dict | None:
        """Stop; log and return what the active steps cost (None if the epoch was too short or the profiler failed)."""
        if self.profiler is None:
            return None
        try:
            self.profiler.__exit__(None, None, None)
            first = self.wait + 1  # marks[k] ends step k: the active steps are first .. first + active - 1
            if len(self.marks) < first + self.active:
                return None
            per_step = 1e-3 / self.active  # the profiler's microseconds in total -> milliseconds per step
            wall = (self.marks[first + self.active - 1] - self.marks[first - 1]) * 1e3 / self.active
            events = self.profiler.key_averages()
            kernels = [e for e in events if str(e.device_type).endswith("CUDA")]
            device = sum(e.device_time_total for e in kernels) * per_step
            host = sum(e.self_cpu_time_total for e in events) * per_step
            top = sorted(kernels, key=lambda e: -e.device_time_total)[:12]
            self.summary = {
                "steps": self.active,
                "wall_ms_per_step": wall,
                "kernel_ms_per_step": device,
                "host_op_ms_per_step": host,
                "top_kernels": [
                    {"name": e.key[:80], "ms_per_step": e.device_time_total * per_step, "calls": e.count} for e in top
                ],
            }
            self.log(
                f"profile of {self.active} steps (all runs together): wall {wall:.1f} ms per step, kernels "
                f"{device:.1f} ms (summed over streams), host time in torch operations {host:.1f} ms"
            )
            for k in self.summary["top_kernels"]:
                self.log(f"  {k['ms_per_step']:8.2f} ms/step  {k['calls']:5d} calls  {k['name']}")
        except Exception as err:  # a diagnosis only
            self.log(f"profile failed ({type(err).__name__}: {err})".splitlines()[0])
        return self.summary


class _Log:
    """Prints with the time since the start, to stdout and to ``relay.log``."""

    def __init__(self, path: Path) -> None:
        self.start, self.file = time.time(), path.open("a")

    def __call__(self, message: str) -> None:
        line = f"[{time.time() - self.start:7.1f} s] {message}"
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _configs(
    names: tuple[str, ...], results: Path, device: str, data_root: str | None, dry: bool, tf32: bool
) -> list[TrainConfig]:
    configs = []
    for name in names:
        experiment = EXPERIMENTS[name]
        overrides: dict[str, Any] = dict(
            resume=True, device=device, tf32=tf32, progress=False, data_root=data_root,
            out_dir=str(results / experiment.out_dir),
        )  # fmt: skip
        if dry:
            overrides.update(DRY_RUN, model_kwargs={**experiment.settings["model_kwargs"], "hidden_size": 8})
        configs.append(experiment.config(**overrides))
    return configs


def _train(
    configs: list[TrainConfig], engine: str, deadline: float, step_seconds: float, log: Callable, info: dict
) -> dict:
    """Round-robin epochs over the unfinished runs until the deadline; epochs and seconds per run.

    A finished run (all its epochs done) is not loaded, so that its files stay as they are, and
    is named in ``info["runs_finished"]``. A run that cannot be resumed (an unreadable
    checkpoint, a changed configuration: a ``ValueError`` such as
    :class:`~organics.runs.CorruptRunFileError`) is left out and named in
    ``info["runs_left_out"]``; the others train.

    Whether the runs' launches go on CUDA streams of their own is decided first
    (``_side_streams``, into ``info["streams"]``); the first epoch's steps are profiled
    (:class:`_StepProfile`, into ``info["profile"]``).
    """
    data: dict[tuple, MNISTSplits] = {}
    trainers: dict[str, Trainer] = {}
    for cfg in configs:
        key = (
            cfg.task,
            cfg.split_seed,
            cfg.permutation_seed,
            cfg.image_size,
            cfg.limit_train,
            cfg.limit_test,
            cfg.n_val,
        )
        try:
            if finished_run(cfg.out_dir, cfg.epochs) is not None:  # resuming would rewrite its files for nothing
                info.setdefault("runs_finished", []).append(cfg.out_dir)
                log(f"{cfg.out_dir}: finished its {cfg.epochs} epochs, left as it is")
                continue
            trainer = Trainer(cfg, command="python -m organics.relay run", data=data.get(key))
        except ValueError as err:  # this run's files or configuration: the others still train
            info.setdefault("runs_left_out", {})[cfg.out_dir] = f"{type(err).__name__}: {err}"
            log(f"{cfg.out_dir}: left out ({type(err).__name__}: {err})")
            continue
        data[key] = trainer.data
        if isinstance(trainer.setup.model, ORGaNICsRNN):
            trainer.setup.model.engine = engine
        trainers[cfg.out_dir] = trainer
        log(f"{cfg.out_dir}: {trainer.progress.epoch} of {cfg.epochs} epochs done")
    steps = {k: -(-len(t.data.x_train) // t.cfg.batch_size) for k, t in trainers.items()}  # per epoch
    unfinished = [t for t in trainers.values() if not t.done]
    for t in unfinished:
        t.setup.model.train()
    info["streams"] = _side_streams(
        [t.setup.model for t in unfinished],
        [t.data.x_train[: t.cfg.batch_size] for t in unfinished],
        [t.data.y_train[: t.cfg.batch_size] for t in unfinished],
    )
    streams = info["streams"]
    log(f"side streams {'used' if streams['used'] else 'not used'}: " + json.dumps(streams))
    forward = functools.partial(classify_together, streams=streams["used"])
    # the first epoch's estimate; an untimed engine (the last resort, step_seconds inf) trains one epoch to find out
    per_run = {k: 1.5 * steps[k] * step_seconds if math.isfinite(step_seconds) else 0.0 for k in trainers}
    while True:
        group = sorted((k for k, t in trainers.items() if not t.done), key=lambda k: trainers[k].progress.epoch)
        while group and time.time() + sum(per_run[k] for k in group) > deadline:
            group.pop()  # leave out the run with the most epochs until the group's epoch fits the budget
        if not group:
            if any(not t.done for t in trainers.values()):
                log("time budget: no further epoch fits; stopping")
            break
        tic = time.time()
        profile = None
        if "profile" not in info:  # the first epoch: profile a few of its steps
            profile = _StepProfile(trainers[group[0]].device, min(steps[k] for k in group), log)
        try:
            records = train_together([trainers[k] for k in group], forward, None if profile is None else profile.step)
        finally:
            if profile is not None:
                info["profile"] = profile.finish()
        seconds = time.time() - tic
        for k in group:  # the next epoch's estimate: this one's time, shared equally
            per_run[k] = seconds / len(group)
        log(f"{len(group)} runs together: one epoch each in {seconds:.1f} s")
        for k, record in zip(group, records, strict=True):
            if record is None:
                log(f"{k}: {trainers[k].diverged}")
            else:
                log(f"{k}: epoch {record['epoch']}, val_acc {record['val_acc']:.4f}, test_acc {record['test_acc']:.4f}")
    summary = {}
    for key, trainer in trainers.items():  # only the runs that trained end their session (a test of best.pt)
        trained = trainer.progress.epoch > trainer.epochs_before
        summary[key] = {
            "epochs_before": trainer.epochs_before,
            "epochs_after": trainer.progress.epoch,
            "train_seconds_this_window": sum(
                r["seconds"] for r in trainer.progress.history if r["epoch"] > trainer.epochs_before
            ),
            "test_acc_best_val": trainer.finish().final["test_acc"] if trained else None,
            "test_acc_last_epoch": trainer.progress.history[-1]["test_acc"],
            "diverged": trainer.diverged,
        }
    return summary


def _kernel_resources(hidden_size: int, log: Callable) -> dict | None:
    """The resident engine's kernels as this machine's Triton compiles them: what they use and issue per step.

    :func:`~organics.networks.scan.persistent_kernel_resources`, logged; a failure is logged, never raised.
    """
    try:
        resources = persistent_kernel_resources(hidden_size, "fp16")
    except Exception as err:
        log(f"kernel resources failed ({type(err).__name__}: {err})".splitlines()[0])
        return None
    for name, r in resources.items():
        log(
            f"resident kernel ({name}, n = {hidden_size}): per step {r['step_instructions']} instructions, "
            f"{r['step_barriers']} barriers, {r['step_local_memory']} spill accesses per warp; "
            f"{r['registers']} registers, {r['stack']} B stack, {r['shared']} B shared"
        )
    return resources


def _time(
    passed: list[str], device: torch.device, shape: dict, info: dict, out: Path, tf32: bool, dry_run: bool
) -> tuple[dict[str, float], Path]:
    """Step 2: every engine that passed, alone and four runs side by side (as Table 2 trains), and the LSTM.

    Writes ``rnn_training_step_<device>.json`` into ``out``; returns the median seconds per training step of each
    contestant and the file's path.
    """
    contestants = (*(f"scan-{e}" for e in passed), *(f"scan-{e}*4" for e in passed), "lstm")
    single = tuple(name for name in contestants if "*" not in name)  # an epoch of each, not of the side-by-side runs
    timing = benchmark(
        **shape,
        device=device.type,
        models=contestants,
        preset="paper",
        epoch_models=single,
        # an epoch of each contestant predicted under EPOCH_LIMIT s (every second timed is a second not trained);
        # a dry run's tiny batches make an epoch 14,250 steps: not timed
        epoch_limit=None if dry_run else EPOCH_LIMIT,
    )
    bench = {"date": info["started"], "command": "python -m organics.relay run", "machine": info["machine"]}
    bench |= {"tf32": tf32, "results": [timing]}
    bench_path = out / f"rnn_training_step_{device.type}.json"
    write_record(bench, bench_path)
    return {name: seconds["median"] for name, seconds in timing["seconds"].items()}, bench_path


def run(
    out: Path,
    minutes: float,
    *,
    names: tuple[str, ...] = RELAY_EXPERIMENTS,
    results: Path = Path("."),
    data_root: str | None = None,
    commit: str | None = None,
    dry_run: bool = False,
    tf32: bool = True,
    timing: bool = True,
) -> dict:
    """The four steps of the module docstring (without step 2 if not ``timing``); returns what ``relay.json`` holds.

    Raises
    ------
    DataIntegrityError
        At once, before any step, if MNIST is missing (from ``data_root`` or the places
        :func:`organics.data.find_mnist_dir` looks in) or fails its checksums: a window would
        otherwise spend its checks and timings and then train nothing.
    """
    load_mnist(data_root, limit_train=1, limit_test=1)
    started = time.time()
    deadline = started + 60 * minutes - (5 if dry_run else 45)  # leave time to pack
    out.mkdir(parents=True, exist_ok=True)
    log = _Log(out / "relay.log")
    device = torch.device("cpu" if dry_run or not torch.cuda.is_available() else "cuda")
    info: dict[str, Any] = {
        "started": datetime.now(timezone.utc).isoformat(),
        "commit": commit,
        "dry_run": dry_run,
        "minutes": minutes,
        "tf32": tf32,
        "machine": machine(device.type),
        "runs": {},
    }
    log(f"device {device}: {info['machine'].get('gpu', info['machine']['cpu'])}")
    bench_path = None
    try:
        ranked, single, bench_path = _check_and_time(device, info, out, log, dry_run, tf32, timing)
        configs = _configs(names, results, device.type, data_root, dry_run, tf32)
        train_started = time.time()
        info["training_errors"] = []
        for engine in ranked:
            if time.time() >= deadline:
                log(f"no time left to train with {engine}")
                break
            info["engine"] = engine
            log(f"training engine: {engine}")
            try:
                info["runs"] = _train(configs, engine, deadline, single[engine], log, info)
                break
            except Exception as err:  # every finished epoch is saved: the next engine resumes from it
                info["training_errors"].append(f"{engine}: {type(err).__name__}: {err}")
                log(f"training with {engine} FAILED ({type(err).__name__}: {err}); trying the next engine")
        minutes_trained = (time.time() - train_started) / 60
        epochs = sum(r["epochs_after"] - r["epochs_before"] for r in info["runs"].values())
        info["training_minutes"] = minutes_trained
        info["epochs_per_minute"] = epochs / minutes_trained if minutes_trained > 0 else None
        log(f"trained {epochs} epochs in {minutes_trained:.1f} min ({info['epochs_per_minute'] or 0:.2f} epochs/min)")
    except BaseException as err:  # stopped (SIGTERM: Terminated) or failed: what is saved still goes back
        info["error"] = f"{type(err).__name__}: {err}".splitlines()[0]
        log(f"stopped early ({info['error']}); packing what is saved")
        raise
    finally:
        _pack(out, names, results, bench_path, info)
        info["wall_seconds"] = time.time() - started
        (out / "relay.json").write_text(json.dumps(info, indent=2, default=str))
        log(f"packed {out / 'relay.tar.gz'} in {info['wall_seconds']:.0f} s")
        log.close()
    return info


def _check_and_time(
    device: torch.device, info: dict, out: Path, log: Callable, dry_run: bool, tf32: bool, timing: bool
) -> tuple[list[str], dict[str, float], Path | None]:
    """Steps 1 and 2: the engines to train with, best first, their seconds per step, and the benchmark's file.

    Without ``timing``, or if the timing fails, the engines are ranked by one training step at
    the full shape (the timing's failure is logged and kept in ``info["timing_error"]``).
    """
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the check compares IEEE float32 with float64
    # on the CPU the Triton engines fail (no GPU): the fallback is exercised; a dry run checks at its tiny size
    checks = check_engines(device, hidden_sizes=(8,) if dry_run else CHECK_HIDDEN_SIZES)
    info["engine_checks"] = [c.__dict__ for c in checks]
    for c in checks:
        verdict = "passed" if c.passed else "FAILED"
        log(f"engine {c.engine}: {verdict} (max relative error {c.max_error:.2e}, {c.detail})")
    passed = [c.engine for c in checks if c.passed]

    shape = (
        dict(batch=4, T=8, hidden_size=8, repeats=1) if dry_run else dict(batch=256, T=784, hidden_size=128, repeats=3)
    )
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    step_seconds = {}  # of one run's forward and backward pass at the full shape
    for engine in list(passed):  # one step at the full shape first: an engine that fails there is left out
        failure, step_seconds[engine] = _runs_at_scale(engine, device, shape["batch"], shape["T"], shape["hidden_size"])
        if failure is not None:
            log(f"engine {engine}: one training step at the timing's shape FAILED ({failure}); left out")
            passed.remove(engine)
    if not passed:  # nothing trains at the full shape: the torch engine is tried all the same, untimed
        passed, step_seconds["torch"] = ["torch"], float("inf")
    info["timing"] = timing
    if timing and device.type == "cuda":
        info["kernel_resources"] = _kernel_resources(shape["hidden_size"], log)
    if timing:
        try:
            medians, bench_path = _time(passed, device, shape, info, out, tf32, dry_run)
        except Exception as err:  # the timing is a measurement, the training what the window is for
            info["timing_error"] = f"{type(err).__name__}: {err}".splitlines()[0]
            log(f"timing FAILED ({info['timing_error']}); ranking the engines by one step instead")
        else:
            log("training step: " + ", ".join(f"{name} {median:.3f} s" for name, median in medians.items()))
            ranked = sorted(passed, key=lambda e: medians[f"scan-{e}*4"])  # the fastest with runs side by side first
            return ranked, {engine: medians[f"scan-{engine}"] for engine in passed}, bench_path
    ranked = sorted(passed, key=step_seconds.get)  # a later call of the same window, or no timing
    how = "engines by one step" if timing else "no timing (--no-timing)"
    log(f"{how}: " + ", ".join(f"{e} {step_seconds[e]:.3f} s per pass" for e in ranked))
    return ranked, {engine: step_seconds[engine] for engine in ranked}, None


def _pack(out: Path, names: tuple[str, ...], results: Path, bench_path: Path | None, info: dict) -> None:
    """Step 4: ``relay.tar.gz`` with the folder of every run this window trained, and the benchmark.

    A run counts as trained when its ``provenance.json`` holds a session of this window (one is
    written with every saved epoch), so that what was saved goes back even if the relay stopped
    early; the runs it did not train stay as they are here. A run whose ``provenance.json``
    cannot be read is left out (named in ``info["runs_not_packed"]``), the others still go.
    The archive's SHA-256 goes into ``info["archive_sha256"]`` (``relay.json``), which
    :func:`unpack` checks.
    """
    with tarfile.open(out / "relay.tar.gz", "w:gz") as tar:
        for name in names:
            run = RunDirectory(results / EXPERIMENTS[name].out_dir)
            try:
                sessions = run.sessions()
            except ValueError as err:  # CorruptRunFileError: this run cannot say what trained it
                info.setdefault("runs_not_packed", {})[name] = f"{type(err).__name__}: {err}"
                continue
            if not any(_written_by(session, info) for session in sessions):
                continue
            for path in (run.metrics, run.provenance, run.best, run.last, run.diverged_step):
                if path.exists():
                    tar.add(path, arcname=f"{EXPERIMENTS[name].out_dir}/{path.name}")
        if bench_path is not None:
            tar.add(bench_path, arcname=bench_path.name)
            bench_path.unlink()
    info["archive_sha256"] = file_sha256(out / "relay.tar.gz")


def _written_by(session: dict, info: dict) -> bool:
    """Whether a provenance ``session`` was written by the relay window ``info`` describes."""
    return (
        session.get("command", "").startswith("python -m organics.relay")
        and session.get("started", "") >= info["started"]
    )


def _from_window(session: dict, info: dict) -> bool:
    """Whether a provenance ``session`` was written by the window ``info`` describes and is not yet stamped."""
    return info.get("commit") is not None and "relay_started" not in session and _written_by(session, info)


def _stamp(record: dict, info: dict) -> None:
    """Name the relay's ``--commit`` in ``record`` (``git_dirty`` unknown); what git said moves to ``device_git_*``."""
    if info.get("commit") is not None:
        record.update(
            device_git_commit=record.get("git_commit"),
            device_git_dirty=record.get("git_dirty"),
            git_commit=info["commit"],
            git_dirty=None,
        )


def _window_name(info: dict, name: str) -> str:
    """A window's file name: its start (UTC, to the minute), the relay's commit and the benchmark's name."""
    started = info["started"][:16].replace(":", "-")
    return f"{started}_{info.get('commit') or 'unknown'}_{name}"


class Terminated(BaseException):  # noqa: N818 - not an error: the run was asked to stop
    """Raised in ``relay run`` by SIGTERM (``timeout`` stopping the command): step 4 still packs what is saved.

    A ``BaseException``, so that no engine's fallback catches it.
    """


def _terminate(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one stop; packing is not interrupted again
    raise Terminated(f"signal {signum}")


class ForkedHistoryError(ValueError):
    """A run here has trained since the copy a relay window resumed it from: unpacking would drop epochs."""


def _check_history(window: dict, target: Path) -> None:
    """Raise :class:`ForkedHistoryError` unless the run at ``target`` is where the window's copy of it began.

    Sessions are matched by their start and the epoch they reached (unpacking leaves both as
    they were). A window's run continues the one here when the sessions here are the first of
    the window's, each as far as here: a session here that is missing from the window, or went
    further here after the window copied it, forks the history. The same window unpacked twice
    is fine: its sessions are all here already.
    """
    if not target.exists():
        return
    here = json.loads(target.read_text())
    sessions_here = [(s.get("started"), s.get("epochs_after")) for s in here.get("sessions", [])]
    sessions_window = [(s.get("started"), s.get("epochs_after")) for s in window.get("sessions", [])]
    if sessions_window[: len(sessions_here)] != sessions_here:
        differ = len(set(sessions_here) - set(sessions_window))
        raise ForkedHistoryError(
            f"{target.parent}: {differ} of its sessions here differ from the window's copy (here at epoch "
            f"{here.get('epochs_completed')}, the window's at {window.get('epochs_completed')}): the histories fork, "
            "keep one (unpack --force takes the window's)"
        )


def unpack(out: Path, results: Path = Path("."), force: bool = False) -> list[str]:
    """Put a relay's runs back under ``results`` (the repository root) and its benchmark under ``results/benchmarks``.

    The benchmark is also kept, under its window's name, in ``results/benchmarks/gpu_windows``
    (:data:`WINDOWS`): the latest window replaces ``rnn_training_step_cuda.json``, the history stays.

    Every provenance session the window added is stamped with the relay's ``--commit``: the tree
    the device ran is a copy of that commit's files, and what git says there (kept as
    ``device_git_commit`` and ``device_git_dirty``) may describe a stale copy of ``.git``, so
    ``git_dirty`` becomes unknown (None); the sessions also name the engine that trained. The
    benchmark's machine record is stamped alike. Returns the run folders written.

    Raises
    ------
    ForkedHistoryError
        Before writing anything, if a run under ``results`` has a session the window's copy of
        it lacks (it trained elsewhere meanwhile); ``force=True`` replaces it by the window's.
    ValueError
        Before writing anything, if ``relay.tar.gz`` does not match the SHA-256 that
        ``relay.json`` records for it (damaged on the way back).
    """
    info = json.loads((out / "relay.json").read_text())
    recorded = info.get("archive_sha256")  # windows before 2026-11-28 recorded none
    if recorded is not None and file_sha256(out / "relay.tar.gz") != recorded:
        raise ValueError(f"{out / 'relay.tar.gz'} does not match the SHA-256 in relay.json: damaged in transfer?")
    written = []
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(out / "relay.tar.gz") as tar:
        tar.extractall(tmp, filter="data")
        folders = [path.parent.relative_to(tmp) for path in sorted(Path(tmp).rglob("provenance.json"))]
        locks = [RunDirectory(results / folder).create().lock() for folder in folders]  # no trainer writes meanwhile
        try:
            if not force:
                for folder in folders:
                    _check_history(json.loads((Path(tmp) / folder / "provenance.json").read_text()),
                                   results / folder / "provenance.json")  # fmt: skip
            for path in sorted(Path(tmp).rglob("*")):
                if path.is_file():
                    _unpack_file(path, path.relative_to(tmp), results, info, written)
        finally:
            for lock in locks:
                lock.unlock()
    return written


def _unpack_file(path: Path, relative: Path, results: Path, info: dict, written: list[str]) -> None:
    """Install one file of a window under ``results``, atomically; provenance and benchmark stamped (:func:`unpack`)."""
    target = results / ("results/benchmarks" if relative.parent == Path(".") else "") / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    if relative.parent == Path("."):  # the benchmark: its machine record names the relay's commit
        benchmark_record = json.loads(path.read_text())
        _stamp(benchmark_record["machine"], info)
        text = json.dumps(benchmark_record, indent=2)
        _replace_atomic(lambda tmp: tmp.write_text(text), target)
        window = results / "results/benchmarks" / WINDOWS / _window_name(info, relative.name)
        window.parent.mkdir(parents=True, exist_ok=True)
        _replace_atomic(lambda tmp: tmp.write_text(text), window)
    elif path.name == "provenance.json":
        provenance = json.loads(path.read_text())
        for session in [provenance, *provenance.get("sessions", [])]:
            if _from_window(session, info):
                _stamp(session, info)
                session["relay_started"] = info["started"]
                if "engine" not in session:  # written before sessions named their engine
                    session["engine"] = info.get("engine")
        text = json.dumps(provenance, indent=2)
        _replace_atomic(lambda tmp: tmp.write_text(text), target)
        written.append(str(target.parent))
    else:
        _replace_atomic(lambda tmp: shutil.copyfile(path, tmp), target)


def main(argv: list[str] | None = None) -> None:
    """Command line: ``run`` (on the GPU) or ``unpack`` (here)."""
    parser = _OneLineParser(prog="python -m organics.relay", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    go = commands.add_parser("run", help="check, time, train, pack (on the GPU)")
    go.add_argument("--out", type=Path, required=True, help="folder for the three files that come back")
    go.add_argument("--minutes", type=float, default=8.0, help="wall-clock budget of the whole command")
    go.add_argument("--data-root", default=None, help="folder holding the four MNIST files")
    go.add_argument("--commit", default=None, help="the git commit of the tree (recorded in every run's provenance)")
    go.add_argument("--only", nargs="+", default=list(RELAY_EXPERIMENTS), choices=list(RELAY_EXPERIMENTS))
    go.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, scratch results folder")
    go.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 products on the GPU")
    go.add_argument(
        "--timing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time the engines and the LSTM (step 2); --no-timing for a later call of the same window: train longer",
    )
    back = commands.add_parser("unpack", help="put a window's runs back under results/ (here)")
    back.add_argument("out", type=Path, help="the folder holding relay.json and relay.tar.gz")
    back.add_argument("--force", action="store_true", help="replace runs that trained here since the window's copy")
    args = parser.parse_args(argv)
    if args.command == "unpack":
        try:
            written = unpack(args.out, force=args.force)
        except (ForkedHistoryError, RunInUseError, OSError, tarfile.TarError, EOFError, zlib.error, ValueError) as err:
            back.error(str(err).splitlines()[0] if str(err) else type(err).__name__)
        for folder in written:
            print(f"updated {folder}")
        return
    if not args.minutes > 0:
        parser.error(f"--minutes must be > 0, got {args.minutes}")
    scratch = tempfile.TemporaryDirectory(prefix="relay_dry_") if args.dry_run else contextlib.nullcontext(".")
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        with scratch as results:  # a dry run's results folder is removed once its runs are packed
            run(args.out, args.minutes, names=tuple(args.only), results=Path(results), data_root=args.data_root,
                commit=args.commit, dry_run=args.dry_run, tf32=args.tf32, timing=args.timing)  # fmt: skip
    except DataIntegrityError as err:
        go.error(f"--data-root: {err}")
    except Terminated:
        print("python -m organics.relay run: stopped by SIGTERM; what was saved is packed", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main(sys.argv[1:])
