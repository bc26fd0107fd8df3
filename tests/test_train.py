"""The trainer: learning, exact resumption, divergence handling, CLI and run records."""

import functools
import hashlib
import json
import math
import platform
import resource
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import organics.train as train_module
from organics.data import load_mnist
from organics.experiments import EXPERIMENTS
from organics.networks import MODELS
from organics.networks.static import StaticORGaNICs
from organics.runs import RunDirectory, finished_run, summarize_run
from organics.train import (
    TrainConfig,
    Trainer,
    TrainingDiverged,
    load_model,
    load_run,
    main,
    parse_args,
    replay_diverged_step,
    train,
    train_together,
)

_cached_mnist = functools.lru_cache(maxsize=4)(load_mnist)

_FAULT = {"interrupt_after": None, "nan_after": None, "poison_at": None}
"""Training steps after which the test model below raises KeyboardInterrupt / outputs NaN, and the step at whose
end its optimizer step makes a weight NaN (its readout bias is NaN once its gradient is in: loss and gradients stay
finite)."""


def _poison(parameter: nn.Parameter) -> None:
    parameter.data.fill_(float("nan"))


class _FaultyModel(nn.Module):
    """A small two-layer ORGaNICs model that can fail on purpose after a number of training steps."""

    def __init__(self, input_size: int, num_classes: int = 10, **options) -> None:
        super().__init__()
        options = {"iterations": 5} | options  # any other LayerOptions field, e.g. gradient="implicit"
        self.inner = StaticORGaNICs(input_size, hidden_sizes=(12, 8), num_classes=num_classes, **options)
        self.fixed_points = self.inner.fixed_points
        self.steps = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.steps += 1
            if _FAULT["interrupt_after"] is not None and self.steps > _FAULT["interrupt_after"]:
                raise KeyboardInterrupt
            if self.steps == _FAULT["poison_at"]:
                bias = [p for name, p in self.inner.named_parameters() if name.endswith("bias")][-1]
                bias.register_post_accumulate_grad_hook(_poison)
        logits = self.inner(x)
        if self.training and _FAULT["nan_after"] is not None and self.steps > _FAULT["nan_after"]:
            logits = logits * float("nan")
        return logits


@pytest.fixture(autouse=True)
def _fast_data_and_no_faults(monkeypatch):
    monkeypatch.setitem(MODELS, "test_faulty", _FaultyModel)
    monkeypatch.setattr(train_module, "load_mnist", _cached_mnist)
    _FAULT.update(interrupt_after=None, nan_after=None, poison_at=None)
    yield
    _FAULT.update(interrupt_after=None, nan_after=None, poison_at=None)


def _config(tmp_path, name: str, **overrides) -> TrainConfig:
    fields = dict(
        model="test_faulty",
        epochs=3,
        batch_size=64,
        limit_train=384,
        limit_test=64,
        image_size=14,
        eval_batch_size=512,
        out_dir=str(tmp_path / name),
        device="cpu",
        progress=False,
        monitor=True,
        monitor_samples=8,
        monitor_iterations=20,
    )
    fields.update(overrides)
    return TrainConfig(**fields)


def _without_times(records):
    return [{k: v for k, v in r.items() if k not in ("seconds", "train_seconds")} for r in records]


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_training_lowers_the_loss_and_records_the_run(tmp_path):
    cfg = _config(tmp_path, "run", model="mlp", model_kwargs={"hidden_sizes": [32]}, lr=3e-3, monitor=False)
    results = train(cfg)
    epochs = results.epochs
    assert [r["epoch"] for r in epochs] == [0, 1, 2, 3]
    assert epochs[-1]["train_loss"] < epochs[1]["train_loss"]
    assert epochs[-1]["val_loss"] < epochs[0]["val_loss"]
    assert len(epochs[1]["grad_norm"]) == 6 and epochs[1]["grad_norm_stats"]["max"] > 0
    loaded = load_run(cfg.out_dir)
    assert _without_times(loaded.epochs) == _without_times(epochs)
    assert loaded.final["test_acc"] == results.final["test_acc"]
    assert loaded.final["best_epoch"] == max(epochs, key=lambda r: r["val_acc"])["epoch"]
    provenance = loaded.provenance
    assert provenance["epochs_completed"] == 3 and provenance["config"]["model"] == "mlp"
    assert provenance["device"].startswith("cpu") and provenance["wall_seconds"] > 0
    assert {"git_commit", "torch", "started", "finished", "command"} <= provenance.keys()
    data = _cached_mnist(task="static", image_size=14, limit_train=384, limit_test=64)
    with torch.no_grad():
        predictions = load_model(cfg.out_dir)(data.x_test).argmax(-1)
    assert (predictions == data.y_test).float().mean().item() == pytest.approx(results.final["test_acc"])


@pytest.mark.parametrize("model_kwargs", [{}, {"gradient": "implicit"}], ids=["unrolled", "implicit"])
def test_interrupted_and_resumed_run_equals_uninterrupted_run(tmp_path, model_kwargs):
    """Also with the implicit solve (on the CPU the compiled loop, whose scratch memory lives from call to call)."""
    full = train(_config(tmp_path, "full", model_kwargs=model_kwargs))
    assert all(r["max_real_eig"][0] < 0 and r["max_real_eig"][1] < 0 for r in full.epochs)

    _FAULT["interrupt_after"] = 8  # 6 steps per epoch: stops in the middle of epoch 2
    with pytest.raises(KeyboardInterrupt):
        train(_config(tmp_path, "interrupted", model_kwargs=model_kwargs))
    assert [r["epoch"] for r in load_run(tmp_path / "interrupted").epochs] == [0, 1]
    _FAULT["interrupt_after"] = None
    resumed = train(_config(tmp_path, "interrupted", model_kwargs=model_kwargs, resume=True))

    assert _without_times(resumed.epochs) == _without_times(full.epochs)
    assert _without_times([resumed.final]) == _without_times([full.final])
    best_full = torch.load(tmp_path / "full" / "best.pt", weights_only=True)
    best_resumed = torch.load(tmp_path / "interrupted" / "best.pt", weights_only=True)
    assert all(torch.equal(best_full[k], best_resumed[k]) for k in best_full)
    sessions = resumed.provenance["sessions"]  # the interrupted session stays on record, with its one epoch
    assert [(s["epochs_before"], s["epochs_after"], s["in_progress"]) for s in sessions] == [
        (0, 1, True),
        (1, 3, False),
    ]


def test_a_run_interrupted_in_its_first_epoch_resumes_to_the_uninterrupted_run(tmp_path):
    """Its checkpoint holds only the untrained model's epoch 0, which the resumed session does not evaluate again."""
    full = train(_config(tmp_path, "full", epochs=2, monitor=False))
    _FAULT["interrupt_after"] = 2
    with pytest.raises(KeyboardInterrupt):
        train(_config(tmp_path, "interrupted", epochs=2, monitor=False))
    assert [r["epoch"] for r in load_run(tmp_path / "interrupted").epochs] == [0]
    _FAULT["interrupt_after"] = None
    resumed = train(_config(tmp_path, "interrupted", epochs=2, resume=True, monitor=False))
    assert _without_times(resumed.epochs) == _without_times(full.epochs)
    assert _without_times([resumed.final]) == _without_times([full.final])


def test_a_new_run_refuses_a_folder_that_holds_a_run(tmp_path):
    """Without resume, a folder with a run's files is not overwritten: nothing in it changes."""
    train(_config(tmp_path, "run", epochs=1, monitor=False))
    files = {path.name: _sha(path) for path in (tmp_path / "run").iterdir() if path.name != ".lock"}
    with pytest.raises(ValueError, match="already holds a run .*--resume"):
        train(_config(tmp_path, "run", epochs=2, monitor=False))
    assert {path.name: _sha(path) for path in (tmp_path / "run").iterdir() if path.name != ".lock"} == files


def test_a_session_stopped_by_its_time_budget_resumes_to_the_uninterrupted_run(tmp_path, capsys, monkeypatch):
    """`--minutes`: a new run trains its first epoch, then no epoch starts that would end after the budget."""
    argv = [
        "--model", "mlp", "--model-kwargs", '{"hidden_sizes": [16]}', "--epochs", "3", "--batch-size", "64",
        "--limit-train", "384", "--limit-test", "64", "--image-size", "14", "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    full = train(parse_args([*argv, "--out", str(tmp_path / "full")]))
    budgeted = [*argv, "--out", str(tmp_path / "budgeted"), "--resume"]
    main([*budgeted, "--minutes", "1e-6"])
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["kind"] == "final"
    assert "stopped after epoch 1 of 3" in captured.err and "--resume" in captured.err
    main([*budgeted, "--minutes", "1e-6"])  # expected to take as long as the recorded epoch 1: nothing starts
    assert "stopped after epoch 1 of 3" in capsys.readouterr().err
    description = train_module.device_description
    monkeypatch.setattr(train_module, "device_description", lambda device: "another " + description(device))
    main([*budgeted, "--minutes", "1e-6"])  # no earlier session on this kind of device: its first epoch starts
    assert "stopped after epoch 2 of 3" in capsys.readouterr().err
    monkeypatch.undo()
    main(budgeted)
    resumed = load_run(tmp_path / "budgeted")
    assert _without_times(resumed.epochs) == _without_times(full.epochs)
    assert _without_times([resumed.final]) == _without_times([full.final])
    sessions = resumed.provenance["sessions"]  # every session ended cleanly, the one that trained nothing too
    assert [(s["epochs_before"], s["epochs_after"], s["in_progress"]) for s in sessions] == [
        (0, 1, False),
        (1, 1, False),
        (1, 2, False),
        (2, 3, False),
    ]


def test_resume_refuses_a_changed_configuration(tmp_path):
    train(_config(tmp_path, "run", epochs=1, monitor=False))
    with pytest.raises(ValueError, match="lr"):
        train(_config(tmp_path, "run", epochs=2, lr=0.5, resume=True, monitor=False))


def test_resume_takes_defaults_for_fields_the_checkpoint_predates(tmp_path):
    """A TrainConfig field added after a checkpoint was written is its default there: resuming works."""
    train(_config(tmp_path, "run", epochs=1, monitor=False))
    last = tmp_path / "run" / "last.pt"
    checkpoint = torch.load(last, weights_only=False)
    del checkpoint["config"]["n_val"]  # as if the field came later (the test runs keep its default)
    torch.save(checkpoint, last)
    assert train(_config(tmp_path, "run", epochs=2, resume=True, monitor=False)).final["epochs_completed"] == 2


def test_resume_refuses_a_trained_folder_without_its_checkpoint(tmp_path):
    """Starting anew would overwrite the folder's results (a results folder committed without last.pt)."""
    train(_config(tmp_path, "run", epochs=1, monitor=False))
    (tmp_path / "run" / "last.pt").unlink()
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="records 1 trained epochs but it has no last.pt"):
        train(_config(tmp_path, "run", epochs=2, resume=True, monitor=False))
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics


def test_resuming_a_finished_run_trains_nothing_and_changes_no_file(tmp_path, capsys):
    """A finished run resumed (the same command again) is returned as it is: no session, no rewritten file."""
    cfg = _config(tmp_path, "run", epochs=2, monitor=False)
    trained = train(cfg)
    files = {path.name: _sha(path) for path in (tmp_path / "run").iterdir() if path.name != ".lock"}
    resumed = train(_config(tmp_path, "run", epochs=2, resume=True, monitor=False, progress=True))
    assert resumed.final == trained.final and _without_times(resumed.epochs) == _without_times(trained.epochs)
    assert {path.name: _sha(path) for path in (tmp_path / "run").iterdir() if path.name != ".lock"} == files
    assert len(resumed.provenance["sessions"]) == 1
    with pytest.raises(ValueError, match="lr"):  # a changed configuration is refused, as for an unfinished run
        train(_config(tmp_path, "run", epochs=2, lr=0.5, resume=True, monitor=False))
    argv = [
        "--model", "test_faulty", "--epochs", "2", "--batch-size", "64", "--limit-train", "384", "--limit-test", "64",
        "--image-size", "14", "--eval-batch-size", "512", "--device", "cpu", "--out", str(tmp_path / "run"),
        "--no-progress", "--no-monitor", "--monitor-samples", "8", "--monitor-iterations", "20",
    ]  # fmt: skip
    main([*argv, "--resume"])
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1]) == trained.final
    assert captured.err.count("\n") == 1 and "has finished its 2 epochs: nothing to train" in captured.err
    assert {path.name: _sha(path) for path in (tmp_path / "run").iterdir() if path.name != ".lock"} == files
    longer = train(_config(tmp_path, "run", epochs=3, resume=True, monitor=False))  # extended: it trains again
    assert longer.provenance["epochs_completed"] == 3 and len(longer.provenance["sessions"]) == 2


def test_finished_run_needs_every_epoch_and_the_final_record(tmp_path):
    assert finished_run(tmp_path / "none", 2) is None
    train(_config(tmp_path, "run", epochs=2, monitor=False))
    assert finished_run(tmp_path / "run", 2).final["kind"] == "final"
    assert finished_run(tmp_path / "run", 3) is None  # planned further
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()[:-1]))  # stopped in finish()
    assert finished_run(tmp_path / "run", 2) is None
    assert train(_config(tmp_path, "run", epochs=2, resume=True, monitor=False)).final["kind"] == "final"
    assert finished_run(tmp_path / "run", 2) is not None


def test_nan_loss_raises_and_keeps_the_last_good_checkpoint(tmp_path):
    train(_config(tmp_path, "run", epochs=1, monitor=False))
    last = tmp_path / "run" / "last.pt"
    before = _sha(last)
    _FAULT["nan_after"] = 2
    with pytest.raises(TrainingDiverged, match="epoch 2, step 3"):
        train(_config(tmp_path, "run", epochs=3, resume=True, monitor=False))
    assert _sha(last) == before
    assert torch.load(last, weights_only=False)["epoch"] == 1
    sessions = json.loads((tmp_path / "run" / "provenance.json").read_text())["sessions"]
    assert [s["diverged"] is None for s in sessions] == [True, False] and "epoch 2, step 3" in sessions[-1]["diverged"]
    assert sessions[-1]["epochs_before"] == sessions[-1]["epochs_after"] == 1
    summary = summarize_run(tmp_path / "run")
    assert "epoch 2, step 3" in summary.diverged and summary.status == "diverged (1 of 3 epochs)"


def test_weights_made_non_finite_by_an_epochs_last_step_stop_the_run_at_its_last_good_checkpoint(tmp_path):
    train(_config(tmp_path, "run", epochs=1, monitor=False))
    last = tmp_path / "run" / "last.pt"
    before = _sha(last)
    _FAULT["poison_at"] = 6  # the last of epoch 2's six steps (the resumed model counts from 1)
    with pytest.raises(TrainingDiverged, match="end of epoch 2: its last optimizer step left non-finite weights"):
        train(_config(tmp_path, "run", epochs=3, resume=True, monitor=False))
    assert _sha(last) == before
    checkpoint = torch.load(last, weights_only=False)
    assert checkpoint["epoch"] == 1 and all(torch.isfinite(w).all() for w in checkpoint["model"].values())


def test_command_line_builds_the_config_and_trains(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = [
        "--task", "static", "--model", "organics2", "--model-kwargs", '{"hidden_sizes": [8, 4], "iterations": 3}',
        "--epochs", "1", "--limit-train", "128", "--limit-test", "32", "--image-size", "7",
        "--step-size", "1", "--device", "cpu", "--out", str(out), "--no-progress",
    ]  # fmt: skip
    cfg = parse_args(argv)
    assert cfg.model_kwargs == {"hidden_sizes": [8, 4], "iterations": 3} and cfg.step_size == 1 and not cfg.progress
    assert parse_args(["--step-size", "none", "--limit-train", "None"]).step_size is None
    main(argv)
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert final["kind"] == "final" and 0 <= final["test_acc"] <= 1
    assert load_run(out).provenance["command"].startswith("python -m organics.train --task static")


def test_config_validation():
    with pytest.raises(ValueError, match="device"):
        TrainConfig(device="tpu")
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="step_size"):
        TrainConfig(step_size=0)
    with pytest.raises(ValueError, match="task must be one of"):
        TrainConfig(task="nope")
    with pytest.raises(ValueError, match="model must be one of"):
        TrainConfig(model="nope")
    with pytest.raises(ValueError, match="model_kwargs"):
        TrainConfig(model_kwargs=[1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="model 'mlp' does not read task 'sequential'.*'lstm', 'organics_rnn'"):
        TrainConfig(task="sequential", model="mlp")
    with pytest.raises(ValueError, match="model 'lstm' does not read task 'static'.*a model of static images"):
        TrainConfig(task="static", model="lstm")
    for field, value in (("epochs", "5"), ("n_val", 0), ("n_val", 60_000), ("split_seed", -1), ("seed", 1.5),
                         ("batch_size", True)):  # fmt: skip
        with pytest.raises(ValueError, match=f"{field} must be an integer"):
            TrainConfig(**{field: value})
    for size in (0, 10, 29):  # a static run's weights must be rebuildable by load_model: image_size divides 28
        with pytest.raises(ValueError, match="image_size must divide 28"):
            TrainConfig(image_size=size)


def test_experiment_on_the_command_line_takes_its_settings_and_the_given_overrides():
    cfg = parse_args(["--experiment", "static/organics2-identity", "--epochs", "2", "--out", "runs/x"])
    assert cfg.model == "organics2" and cfg.model_kwargs == {"recurrence": "identity"} and cfg.monitor
    assert cfg.epochs == 2 and cfg.out_dir == "runs/x" and not cfg.resume
    assert parse_args(["--experiment", "smnist/lstm-128", "--resume"]).out_dir == "results/sequential/smnist_lstm"


@pytest.mark.parametrize(
    ("argv", "parameter"),
    [
        (["--task", "nope"], "task"),
        (["--model", "nope"], "model"),
        (["--experiment", "nope"], "experiment"),
        (["--epochs", "0"], "epochs"),
        (["--epochs", "two"], "--epochs"),
        (["--lr", "-1"], "lr"),
        (["--model-kwargs", "{not json"], "--model-kwargs"),
        (["--model-kwargs", "[1, 2]"], "--model-kwargs"),
        (["--image-size", "10"], "image_size"),
        (["--no-such-option"], "--no-such-option"),
        (["--data-root", "/nonexistent", "--epochs", "1", "--out", "{tmp}"], "MNIST directory"),
        (["--model-kwargs", '{"bad": 1}', "--limit-train", "64", "--out", "{tmp}"], "model_kwargs"),
        (["--epochs", "1", "--out", "/dev/null/run"], "/dev/null/run"),
        (["--minutes", "0", "--epochs", "1", "--out", "{tmp}"], "minutes"),
        (["--minutes", "soon"], "--minutes"),
        (["--list-exp"], "--list-exp"),
        (["--task", "permuted", "--model", "organics2"], "model 'organics2' does not read task 'permuted'"),
        (["--lr", "inf"], "lr"),
        (["--weight-decay", "nan"], "weight_decay"),
        (["--gamma", "inf"], "gamma"),
    ],
)
def test_command_line_errors_are_one_line_naming_the_parameter(argv, parameter, tmp_path, capsys):
    argv = [arg.replace("{tmp}", str(tmp_path / "run")) for arg in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m organics.train: error:") and parameter in err
    assert "Traceback" not in err


def test_command_line_error_as_a_subprocess_prints_no_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "organics.train", "--task", "nope"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "python -m organics.train: error: task must be one of ('static', 'sequential', 'permuted'), got 'nope'"
    ]


def test_list_experiments_names_every_experiment(capsys):
    main(["--list-experiments"])
    out = capsys.readouterr().out
    for name, experiment in EXPERIMENTS.items():
        assert f"{name}\n" in out and experiment.out_dir in out


def test_runs_trained_together_equal_runs_trained_alone(tmp_path):
    """Interleaved steps and one backward pass of the summed losses change nothing in either run."""
    configs = {
        "a": dict(model="mlp", model_kwargs={"hidden_sizes": [16]}, seed=1, epochs=2, monitor=False),
        "b": dict(model="test_faulty", seed=2, epochs=2, monitor=False, limit_train=320),  # fewer steps per epoch
    }
    alone = {k: train(_config(tmp_path, f"alone-{k}", **c)) for k, c in configs.items()}
    trainers = [Trainer(_config(tmp_path, f"together-{k}", **c)) for k, c in configs.items()]
    for _ in range(2):
        records = train_together(trainers)
        assert [r["runs_together"] for r in records] == [2, 2]
    for trainer, key in zip(trainers, configs, strict=True):
        result = trainer.finish()
        for mine, theirs in zip(result.epochs, alone[key].epochs, strict=True):
            for field in ("train_loss", "val_acc", "test_acc", "grad_norm"):
                assert mine.get(field) == theirs.get(field), (key, field)
        assert result.final["test_acc"] == alone[key].final["test_acc"]


def test_a_diverging_run_stops_alone_when_trained_together(tmp_path):
    _FAULT["nan_after"] = 2
    trainers = [
        Trainer(_config(tmp_path, "faulty", epochs=2, monitor=False)),
        Trainer(_config(tmp_path, "mlp", model="mlp", model_kwargs={"hidden_sizes": [16]}, epochs=2, monitor=False)),
    ]
    faulty_last = _sha(tmp_path / "faulty" / "last.pt")
    records = train_together(trainers)
    assert records[0] is None and records[1]["epoch"] == 1
    assert trainers[0].done and "epoch 1, step 3" in trainers[0].diverged
    assert _sha(tmp_path / "faulty" / "last.pt") == faulty_last  # the untrained model's checkpoint stays
    assert not trainers[1].done and train_together(trainers[1:])[0]["epoch"] == 2


def test_a_diverged_step_is_kept_with_the_weights_and_batch_it_used(tmp_path):
    _FAULT["nan_after"] = 2
    trainer = Trainer(_config(tmp_path, "run", epochs=2, monitor=False))
    assert train_together([trainer]) == [None]
    step = RunDirectory(tmp_path / "run").load_diverged_step()
    assert (step["epoch"], step["step"], step["message"]) == (1, 3, trainer.diverged) and math.isnan(step["loss"])
    weights = trainer.setup.model.state_dict()  # the divergence skipped the optimizer step: the weights step 3 used
    assert step["model"].keys() == weights.keys() and all(torch.equal(step["model"][k], weights[k]) for k in weights)
    data = trainer.data
    rows = (step["x"].flatten(1)[:, None, :] == data.x_train.flatten(1)[None]).all(-1)  # each batch row in the set
    assert len(step["x"]) == 64 and bool(rows.any(1).all())
    assert torch.equal(step["y"], data.y_train[rows.int().argmax(1)])
    with pytest.raises(FileNotFoundError, match="has not diverged"):
        RunDirectory(tmp_path / "other").load_diverged_step()


def test_replaying_a_diverged_step_tells_float32_overflow_from_a_finite_gradient(tmp_path):
    """Adam's first step moves every weight by about lr = 1e30; the next forward pass overflows float32, not float64."""
    cfg = _config(tmp_path, "run", model="mlp", model_kwargs={"hidden_sizes": [16]}, lr=1e30, epochs=1, monitor=False)
    with pytest.raises(TrainingDiverged, match="epoch 1, step 2"):
        train(cfg)
    saved = RunDirectory(tmp_path / "run").load_diverged_step()
    single = replay_diverged_step(tmp_path / "run")
    assert not (math.isfinite(single.loss) and math.isfinite(single.grad_norm))
    assert [single.loss, single.grad_norm] == pytest.approx([saved["loss"], saved["grad_norm"]], nan_ok=True)
    double = replay_diverged_step(tmp_path / "run", torch.float64)
    assert math.isfinite(double.loss) and math.isfinite(double.grad_norm)
    assert max(double.loss, double.grad_norm) > float(np.finfo(np.float32).max)  # beyond float32: it overflowed
    assert all(bad == 0 for bad, _ in double.nonfinite.values())
    assert double.nonfinite.keys() == {name for name, _ in load_model(tmp_path / "run").named_parameters()}
    assert double.input_grad_norm.shape == (64, 14 * 14) and np.isfinite(double.input_grad_norm).all()
    untrained = RunDirectory(tmp_path / "run").load_checkpoint()["model"]  # epoch 0: before Adam's first step
    before = replay_diverged_step(tmp_path / "run", weights=untrained)  # the same batch, in float32
    assert math.isfinite(before.loss) and 0 < before.grad_norm < math.inf


def test_training_leaves_subnormal_floats_working(tmp_path):
    """Training flushes subnormals to zero on the CPU (speed), but not for the rest of the process (NumPy shares it)."""
    train(_config(tmp_path, "run", model="mlp", model_kwargs={"hidden_sizes": [16]}, epochs=1, monitor=False))
    assert torch.tensor([1e-40]).mul(1.0).item() != 0
    assert np.float32(1e-40) * np.float32(1.0) != 0


def _faults_of_allocating(nbytes: int) -> int:
    """Minor page faults of allocating and filling ``nbytes`` (then freeing them)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(nbytes // 4)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_training_keeps_freed_memory_and_returns_it_afterwards():
    """Inside the trainer's memory setting, freed 64 MiB buffers are reused without page faults; after it, not."""
    with train_module._freed_memory_kept():
        faults = [_faults_of_allocating(64 << 20) for _ in range(8)]
    assert faults[0] > 0 and sum(faults[4:]) <= faults[0] // 100  # a few frees until the heap has room
    assert _faults_of_allocating(64 << 20) > faults[0] // 10  # returned to the system: fresh pages again
