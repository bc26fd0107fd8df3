"""The GPU relay, end to end on the CPU at tiny sizes (--dry-run): check, time, train, pack, unpack."""

import json
import math
import os
import signal
import tarfile
import tempfile
import time

import pytest
import torch
from helpers import locked_by_another_process

import organics.train as train_module
from organics import relay
from organics.benchmark import benchmark
from organics.experiments import EXPERIMENTS
from organics.networks import LSTMClassifier
from organics.relay import RELAY_EXPERIMENTS, ForkedHistoryError, Terminated, check_engines, main, run, unpack
from organics.runs import RunDirectory, load_run


def test_relay_advances_every_table_2_run():
    organics = [n for n in RELAY_EXPERIMENTS if EXPERIMENTS[n].settings["model"] == "organics_rnn"]
    assert len(organics) == 8 and {"smnist/lstm-128", "psmnist/lstm-128"} < set(RELAY_EXPERIMENTS)
    assert all(EXPERIMENTS[n].paper_accuracy for n in RELAY_EXPERIMENTS)


def test_engine_check_falls_back_when_an_engine_fails():
    checks = check_engines(torch.device("cpu"))  # no GPU: the Triton engines raise, "torch" must pass
    assert [c.engine for c in checks] == ["resident", "persistent", "triton", "torch"]
    assert not any(c.passed for c in checks[:3]) and "Triton" in checks[2].detail
    assert checks[3].passed and checks[3].max_error < 1e-3


def test_dry_run_trains_packs_and_unpacks_every_run(tmp_path):
    out, scratch, repo = tmp_path / "out", tmp_path / "scratch", tmp_path / "repo"
    info = run(out, 5, results=scratch, commit="abc123", dry_run=True)
    assert sorted(p.name for p in out.iterdir()) == ["relay.json", "relay.log", "relay.tar.gz"]
    assert info["engine"] == "torch" and info["epochs_per_minute"] > 0
    assert all(r["epochs_after"] == 2 and r["diverged"] is None for r in info["runs"].values())
    log = (out / "relay.log").read_text()
    assert log.count(f"{len(RELAY_EXPERIMENTS)} runs together: one epoch each") == 2  # all runs in every epoch
    profile = info["profile"]  # a few steps of the first epoch, profiled (no device here: no kernels)
    assert profile["steps"] >= 1 and profile["wall_ms_per_step"] > 0 and profile["host_op_ms_per_step"] > 0
    assert log.count("profile of") == 1
    assert info["streams"] == {"used": False, "detail": "no CUDA streams on the cpu"}  # decided on a GPU only
    assert log.count("side streams not used") == 1
    with tarfile.open(out / "relay.tar.gz") as tar:
        names = tar.getnames()
    assert "rnn_training_step_cpu.json" in names and len(names) == 1 + 4 * len(RELAY_EXPERIMENTS)

    written = unpack(out, repo)
    assert len(written) == len(RELAY_EXPERIMENTS)
    for name in RELAY_EXPERIMENTS:
        results = load_run(repo / EXPERIMENTS[name].out_dir)
        assert [r["epoch"] for r in results.epochs] == [0, 1, 2]
        (session,) = results.provenance["sessions"]
        assert session["command"] == "python -m organics.relay run" and session["epochs_after"] == 2
        assert session["git_commit"] == "abc123" and session["relay_started"] == info["started"]
        assert "device_git_commit" in session  # what git said on the machine that ran it, kept beside
        assert session["engine"] == ("torch" if "organics" in name else None)  # the scan engine that trained it
    benchmark_record = json.loads((repo / "results/benchmarks/rnn_training_step_cpu.json").read_text())
    assert benchmark_record["results"] and benchmark_record["machine"]["git_commit"] == "abc123"
    assert "epoch_seconds" not in benchmark_record["results"][0]  # a dry run times steps, not epochs
    (window,) = (repo / "results/benchmarks/gpu_windows").iterdir()  # the window's own copy, kept as history
    assert window.name == f"{info['started'][:13]}-{info['started'][14:16]}_abc123_rnn_training_step_cpu.json"
    assert json.loads(window.read_text()) == benchmark_record


def test_the_benchmark_times_epochs_of_the_models_asked_for():
    """The relay times an epoch of each single run, not of the runs side by side (their step time says enough)."""
    models = ("scan-torch", "scan-torch*2", "lstm")
    row = benchmark(2_000, 2, 4, "cpu", 1, models=models, epoch_limit=60.0, epoch_models=("scan-torch", "lstm"))
    assert row["epoch_steps"] == 29 and set(row["seconds"]) == set(models)
    assert set(row["epoch_seconds"]) == {"scan-torch", "lstm"} and set(row["epoch_ratio_to_lstm"]) == {"scan-torch"}


def test_a_second_window_resumes_and_the_budget_stops_early(tmp_path):
    names = ("smnist/organics-64", "smnist/lstm-128")
    first = run(tmp_path / "w1", 5, names=names, results=tmp_path / "repo", dry_run=True)
    assert all(r["epochs_after"] == 2 for r in first["runs"].values())
    main(["run", "--out", str(tmp_path / "w2"), "--minutes", "0.001", "--dry-run", "--only", *names])
    second = json.loads((tmp_path / "w2" / "relay.json").read_text())
    assert all(r["epochs_after"] == r["epochs_before"] for r in second["runs"].values())  # no time left: no epoch
    assert "time budget" in (tmp_path / "w2" / "relay.log").read_text() or not second["runs"]


def test_a_diverged_run_comes_back_with_its_diverged_step(tmp_path, monkeypatch):
    """The LSTM's loss is made NaN at its first step: it stops there, the other run trains, both are packed."""
    loss = train_module._loss
    monkeypatch.setattr(
        train_module,
        "_loss",
        lambda model, *a: loss(model, *a) * (math.nan if isinstance(model, LSTMClassifier) else 1),
    )
    names = ("smnist/organics-64", "smnist/lstm-128")
    info = run(
        tmp_path / "w1", 5, names=names, results=tmp_path / "scratch", commit="abc123", dry_run=True, timing=False
    )
    lstm, organics = (info["runs"][str(tmp_path / "scratch" / EXPERIMENTS[name].out_dir)] for name in names[::-1])
    assert "epoch 1, step 1" in lstm["diverged"] and lstm["epochs_after"] == 0 and organics["epochs_after"] == 2
    unpack(tmp_path / "w1", tmp_path / "repo")
    lstm_run = RunDirectory(tmp_path / "repo" / EXPERIMENTS["smnist/lstm-128"].out_dir)
    (session,) = lstm_run.sessions()  # on record although it trained no epoch, stamped as the window's
    assert "epoch 1, step 1" in session["diverged"] and session["relay_started"] == info["started"]
    step = lstm_run.load_diverged_step()
    assert (step["epoch"], step["step"]) == (1, 1) and math.isnan(step["loss"])
    assert not (tmp_path / "repo" / EXPERIMENTS["smnist/organics-64"].out_dir / "diverged.pt").exists()


def test_a_finished_run_is_left_as_it_is(tmp_path):
    """A run with all its epochs done is not resumed (which would drop its final record) nor packed."""
    names = ("smnist/organics-64", "smnist/lstm-128")
    repo = tmp_path / "repo"
    run(tmp_path / "w1", 5, names=names, results=repo, dry_run=True, timing=False)  # both finish: 2 of 2 epochs
    files = {path: path.read_bytes() for path in repo.rglob("*") if path.is_file() and path.name != ".lock"}
    assert all(load_run(repo / EXPERIMENTS[name].out_dir).final is not None for name in names)
    second = run(tmp_path / "w2", 5, names=names, results=repo, dry_run=True, timing=False)
    assert second["runs"] == {} and second["runs_finished"] == [str(repo / EXPERIMENTS[n].out_dir) for n in names]
    assert {path: path.read_bytes() for path in files} == files  # not a byte changed
    assert (tmp_path / "w2" / "relay.log").read_text().count("finished its 2 epochs, left as it is") == 2
    with tarfile.open(tmp_path / "w2" / "relay.tar.gz") as tar:
        assert tar.getnames() == []


def test_a_later_call_without_timing_trains_and_packs_no_benchmark(tmp_path, monkeypatch):
    """--no-timing (a second call of a window): no step 2, the engines ranked by their step at full shape."""
    names = ("smnist/organics-64",)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    main(["run", "--out", str(tmp_path / "w"), "--minutes", "5", "--dry-run", "--no-timing", "--only", *names])
    info = json.loads((tmp_path / "w" / "relay.json").read_text())
    assert info["timing"] is False and info["engine"] == "torch"
    assert all(r["epochs_after"] == 2 for r in info["runs"].values())
    assert "no timing (--no-timing): torch" in (tmp_path / "w" / "relay.log").read_text()
    assert not list(tmp_path.glob("relay_dry_*"))  # the dry run's scratch results folder is gone
    with tarfile.open(tmp_path / "w" / "relay.tar.gz") as tar:
        assert not any(name.startswith("rnn_training_step") for name in tar.getnames())
    written = unpack(tmp_path / "w", tmp_path / "repo")
    assert len(written) == 1 and not (tmp_path / "repo" / "results" / "benchmarks").exists()


def test_an_engine_that_fails_at_full_shape_or_in_training_is_left_behind(tmp_path, monkeypatch):
    """An engine that passed its check but fails a step at the timing's shape is left out; if training raises,
    the relay logs it, tries the next engine, and still packs what the runs saved."""
    from organics.relay import EngineCheck

    names = ("smnist/organics-64",)
    monkeypatch.setattr(
        relay,
        "check_engines",
        lambda device, **kwargs: [EngineCheck("persistent", True, 0.0, "as if"), *check_engines(device, **kwargs)],
    )
    info = run(tmp_path / "w1", 5, names=names, results=tmp_path / "repo", dry_run=True)
    assert info["engine"] == "torch" and info["training_errors"] == []
    assert (
        "engine persistent: one training step at the timing's shape FAILED"
        in (tmp_path / "w1" / "relay.log").read_text()
    )

    def broken(*args, **kwargs):
        raise RuntimeError("a kernel failed mid-epoch")

    monkeypatch.setattr(relay, "_train", broken)
    info = run(tmp_path / "w2", 5, names=names, results=tmp_path / "repo", dry_run=True)
    assert info["runs"] == {} and info["training_errors"] == ["torch: RuntimeError: a kernel failed mid-epoch"]
    assert sorted(p.name for p in (tmp_path / "w2").iterdir()) == ["relay.json", "relay.log", "relay.tar.gz"]


def test_unpack_refuses_a_run_that_trained_here_since_the_window_copied_it(tmp_path, capsys, monkeypatch):
    """A CPU session here after the window's copy forks the history: unpack changes nothing and says so."""
    name = "smnist/organics-64"
    out, repo = tmp_path / "w", tmp_path / "repo"
    run(out, 5, names=(name,), results=tmp_path / "device", dry_run=True)
    assert len(unpack(out, repo)) == 1 and len(unpack(out, repo)) == 1  # the same window twice: harmless
    provenance_path = repo / EXPERIMENTS[name].out_dir / "provenance.json"
    provenance = json.loads(provenance_path.read_text())
    cpu_session = {**provenance["sessions"][-1], "started": "2999-01-01T00:00:00+00:00", "epochs_before": 2}
    provenance.update(sessions=[*provenance["sessions"], cpu_session], epochs_completed=3)
    provenance_path.write_text(json.dumps(provenance))
    before = {path: path.read_bytes() for path in repo.rglob("*") if path.is_file()}
    with pytest.raises(
        ForkedHistoryError, match="organics-64: 1 of its sessions here differ .*here at epoch 3, the window's at 2"
    ):
        unpack(out, repo)
    assert {path: path.read_bytes() for path in repo.rglob("*") if path.is_file()} == before
    grown = {**provenance["sessions"][0], "epochs_after": 3}  # the window's session went on here after the copy
    provenance_path.write_text(json.dumps({**provenance, "sessions": [grown], "epochs_completed": 3}))
    with pytest.raises(ForkedHistoryError, match="1 of its sessions here differ"):
        unpack(out, repo)
    monkeypatch.chdir(repo)  # the CLI unpacks into the current folder: one line on stderr, exit status 2
    with pytest.raises(SystemExit) as stop:
        main(["unpack", str(out)])
    assert stop.value.code == 2 and "the histories fork" in capsys.readouterr().err.splitlines()[-1]
    unpack(out, repo, force=True)
    assert len(json.loads(provenance_path.read_text())["sessions"]) == 1


def test_missing_data_stops_the_relay_before_it_spends_the_window(tmp_path, capsys):
    started = time.time()
    with pytest.raises(SystemExit) as stop:
        main(["run", "--out", str(tmp_path / "w"), "--dry-run", "--data-root", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and err[-1].startswith(
        "python -m organics.relay run: error: --data-root: MNIST directory"
    )
    assert time.time() - started < 30 and not (tmp_path / "w").exists()  # no engine checked, nothing written
    with pytest.raises(SystemExit) as stop:
        main(["unpack", str(tmp_path / "nowhere")])
    assert stop.value.code == 2 and "relay.json" in capsys.readouterr().err


def test_a_run_that_cannot_resume_is_left_out_and_the_others_train(tmp_path, monkeypatch):
    names = ("smnist/organics-64", "psmnist/organics-64")
    repo = tmp_path / "repo"
    monkeypatch.setitem(relay.DRY_RUN, "epochs", 1)  # the first window leaves both runs unfinished
    run(tmp_path / "w1", 5, names=names, results=repo, dry_run=True)
    monkeypatch.undo()
    broken = repo / EXPERIMENTS[names[0]].out_dir / "last.pt"
    broken.write_bytes(broken.read_bytes()[:1000])
    info = run(tmp_path / "w2", 5, names=names, results=repo, dry_run=True)
    assert list(info["runs_left_out"]) == [str(broken.parent)]
    assert info["runs_left_out"][str(broken.parent)].startswith(f"CorruptRunFileError: cannot read {broken}")
    assert list(info["runs"]) == [str(repo / EXPERIMENTS[names[1]].out_dir)]  # the healthy run went on (finished)
    assert "left out (CorruptRunFileError" in (tmp_path / "w2" / "relay.log").read_text()


def test_a_run_with_an_unreadable_provenance_is_left_out_and_the_window_still_packs(tmp_path):
    names = ("smnist/organics-64", "psmnist/organics-64")
    repo = tmp_path / "repo"
    (repo / EXPERIMENTS[names[0]].out_dir).mkdir(parents=True)
    (repo / EXPERIMENTS[names[0]].out_dir / "provenance.json").write_text("{not json")
    info = run(tmp_path / "w", 5, names=names, results=repo, dry_run=True)
    assert list(info["runs_not_packed"]) == [names[0]] and "CorruptRunFileError" in info["runs_not_packed"][names[0]]
    assert json.loads((tmp_path / "w" / "relay.json").read_text())["archive_sha256"] == info["archive_sha256"]
    assert unpack(tmp_path / "w", tmp_path / "here") == [str(tmp_path / "here" / EXPERIMENTS[names[1]].out_dir)]


def test_unpack_refuses_a_damaged_archive_before_writing_anything(tmp_path, capsys, monkeypatch):
    out, repo = tmp_path / "w", tmp_path / "repo"
    run(out, 5, names=("smnist/organics-64",), results=tmp_path / "device", dry_run=True)
    archive = out / "relay.tar.gz"
    damaged = bytearray(archive.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    archive.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="does not match the SHA-256 in relay.json"):
        unpack(out, repo)
    assert not repo.exists()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["unpack", str(out)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "damaged in transfer" in err


def test_the_untimed_last_resort_engine_trains(tmp_path, monkeypatch):
    """No engine trains at the full shape: the torch engine is tried untimed, and trains an epoch to learn its pace."""
    monkeypatch.setattr(relay, "_runs_at_scale", lambda *args: ("as if out of memory", 0.0))
    info = run(tmp_path / "w", 5, names=("smnist/organics-64",), results=tmp_path / "repo", dry_run=True, timing=False)
    assert info["engine"] == "torch"
    assert [r["epochs_after"] for r in info["runs"].values()] == [2]


def test_a_window_stopped_by_sigterm_packs_its_saved_epochs_and_the_next_resumes(tmp_path, monkeypatch):
    """`timeout` ends the command in the middle of an epoch: the epochs saved go back, and the next window resumes."""
    names = ("smnist/organics-64", "smnist/lstm-128")
    device_tree, here = tmp_path / "device", tmp_path / "here"
    original, epochs_started = relay.train_together, []

    def sigterm_in_the_second_epoch(*args, **kwargs):
        epochs_started.append(1)
        if len(epochs_started) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(relay, "train_together", sigterm_in_the_second_epoch)
    previous = signal.signal(signal.SIGTERM, relay._terminate)  # as `relay run` does
    try:
        with pytest.raises(Terminated):
            run(tmp_path / "w1", 5, names=names, results=device_tree, dry_run=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    info = json.loads((tmp_path / "w1" / "relay.json").read_text())
    assert info["error"].startswith("Terminated") and "stopped early" in (tmp_path / "w1" / "relay.log").read_text()
    with tarfile.open(tmp_path / "w1" / "relay.tar.gz") as tar:
        assert len(tar.getnames()) == 1 + 4 * len(names)  # both runs' folders (epoch 1 saved) and the benchmark
    monkeypatch.setattr(relay, "train_together", original)
    second = run(tmp_path / "w2", 5, names=names, results=device_tree, dry_run=True)
    assert all((r["epochs_before"], r["epochs_after"]) == (1, 2) for r in second["runs"].values())
    unpack(tmp_path / "w1", here)
    unpack(tmp_path / "w2", here)  # continues the first window's history: no fork
    for name in names:
        results = load_run(here / EXPERIMENTS[name].out_dir)
        assert [r["epoch"] for r in results.epochs] == [0, 1, 2]
        assert [(s["epochs_before"], s["epochs_after"]) for s in results.provenance["sessions"]] == [(0, 1), (1, 2)]


def test_a_failed_timing_ranks_the_engines_by_one_step_and_trains(tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory with four runs side by side")

    monkeypatch.setattr(relay, "_time", out_of_memory)
    info = run(tmp_path / "w", 5, names=("smnist/organics-64",), results=tmp_path / "repo", dry_run=True)
    assert info["timing_error"] == "RuntimeError: CUDA out of memory with four runs side by side"
    assert all(r["epochs_after"] == 2 for r in info["runs"].values())
    with tarfile.open(tmp_path / "w" / "relay.tar.gz") as tar:
        assert len(tar.getnames()) == 4  # the run's folder, no benchmark


def test_unpack_refuses_a_run_that_a_process_trains_here(tmp_path, capsys, monkeypatch):
    """A process training a run here holds its lock: unpack refuses in one line instead of racing it."""
    name = "smnist/organics-64"
    out, repo = tmp_path / "w", tmp_path / "repo"
    run(out, 5, names=(name,), results=tmp_path / "device", dry_run=True)
    folder = repo / EXPERIMENTS[name].out_dir
    folder.mkdir(parents=True)
    with locked_by_another_process(folder) as holder:
        monkeypatch.chdir(repo)
        with pytest.raises(SystemExit) as stop:
            main(["unpack", str(out)])
        assert stop.value.code == 2 and f"in use by another process (pid {holder.pid}" in capsys.readouterr().err
        assert not (folder / "provenance.json").exists()
    assert unpack(out, repo) == [str(folder)]
