"""Run directories read back: results tables take final-epoch and best-validation accuracies from them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import locked_by_another_process

from organics.runs import CorruptRunFileError, RunDirectory, RunInUseError, code_version, load_run, summarize_run
from organics.train import main

ROOT = Path(__file__).resolve().parents[1]


def _write_run(path: Path, val_accs: list[float], test_accs: list[float], epochs: int) -> None:
    run = RunDirectory(path).create()
    records = [
        {"kind": "epoch", "epoch": k, "val_acc": v, "test_acc": t}
        for k, (v, t) in enumerate(zip(val_accs, test_accs, strict=True))
    ]
    run.write_metrics(records)
    run.write_provenance({"config": {"epochs": epochs}, "sessions": [{"device": "cpu: x"}, {"device": "cuda: H100"}]})


def test_summary_reports_the_last_epoch_and_the_best_validation_epoch(tmp_path):
    _write_run(tmp_path / "run", [0.1, 0.5, 0.7, 0.7, 0.6], [0.1, 0.52, 0.71, 0.69, 0.65], epochs=10)
    summary = summarize_run(tmp_path / "run")
    assert summary.epochs_completed == 4 and summary.final_test_acc == 0.65
    assert summary.best_epoch == 2 and summary.best_val_test_acc == 0.71  # the first of equal validation scores
    assert summary.status == "in progress (4 of 10 epochs)" and not summary.finished
    assert summary.devices == ("cpu: x", "cuda: H100")
    assert summarize_run(tmp_path / "run", epochs_planned=4).status == "finished"


def test_summary_of_a_missing_or_untrained_run_is_none(tmp_path):
    assert summarize_run(tmp_path / "nothing") is None
    _write_run(tmp_path / "untrained", [0.1], [0.1], epochs=3)
    assert summarize_run(tmp_path / "untrained") is None


def test_committed_static_run_summary_agrees_with_its_final_record():
    out = ROOT / "results/static_mnist/organics2"
    summary, final = summarize_run(out), load_run(out).final
    assert summary.finished and summary.best_epoch == final["best_epoch"]
    assert summary.best_val_test_acc == pytest.approx(final["test_acc"])


def test_run_directory_writes_atomically(tmp_path):
    run = RunDirectory(tmp_path / "r").create()
    run.write_provenance({"a": 1})
    assert json.loads(run.provenance.read_text()) == {"a": 1} and not list(run.path.glob("*.tmp"))
    assert run.sessions() == [] and run.load_checkpoint() is None


_PROBE = "import sys; from organics.runs import RunDirectory; RunDirectory(sys.argv[1]).lock()"


def test_a_run_locked_by_one_process_is_refused_to_another(tmp_path):
    """Two processes training one run would interleave its epochs: the second is refused, in one line."""
    with locked_by_another_process(tmp_path) as holder:
        with pytest.raises(RunInUseError, match=f"in use by another process \\(pid {holder.pid} on "):
            RunDirectory(tmp_path).lock()
        command = [sys.executable, "-m", "organics.train", "--task", "sequential", "--model", "lstm", "--epochs", "1"]
        result = subprocess.run([*command, "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines() == [
            f"python -m organics.train: error: run directory {tmp_path} is in use by another process "
            f"(pid {holder.pid} on {__import__('platform').node()})"
        ]
    RunDirectory(tmp_path).lock().unlock()  # the holder's lock went with its process


def test_the_process_holding_a_run_may_lock_it_again_and_unlock_frees_it(tmp_path):
    def another_process_may_lock() -> bool:
        return subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path)], capture_output=True).returncode == 0

    first = RunDirectory(tmp_path).lock()
    second = RunDirectory(tmp_path).lock()  # the same process (a notebook re-running its cell)
    assert not another_process_may_lock()
    first.unlock()
    second.unlock()
    assert another_process_may_lock()


def test_corrupt_run_files_are_named_in_one_line(tmp_path, capsys):
    """A truncated checkpoint or unparsable metrics/provenance: an error naming the file, not a traceback."""
    out = tmp_path / "run"
    argv = ["--task", "sequential", "--model", "lstm", "--image-size", "7", "--limit-train", "64", "--limit-test", "32"]
    main([*argv, "--epochs", "1", "--out", str(out)])
    last = out / "last.pt"
    last.write_bytes(last.read_bytes()[:5000])
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--epochs", "2", "--out", str(out), "--resume"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"python -m organics.train: error: cannot read {last} (corrupt or truncated?)")
    with pytest.raises(CorruptRunFileError, match="provenance.json"):
        (out / "provenance.json").write_text('{"config": ')
        load_run(out)
    with pytest.raises(CorruptRunFileError, match="metrics.jsonl.*JSONDecodeError"):
        (out / "metrics.jsonl").write_text('{"kind": "epoch", "epoch": 0}\n{"kind": "ep')
        load_run(out)
    with pytest.raises(CorruptRunFileError, match="diverged.pt"):
        (out / "diverged.pt").write_bytes(last.read_bytes()[:1000])
        RunDirectory(out).load_diverged_step()


def test_run_files_that_parse_but_are_not_what_they_should_be_are_named_in_one_line(tmp_path, capsys):
    """A best.pt copied over last.pt, a provenance.json that holds no object: the same one-line error."""
    out = tmp_path / "run"
    argv = ["--task", "sequential", "--model", "lstm", "--image-size", "7", "--limit-train", "64", "--limit-test", "32"]
    main([*argv, "--epochs", "1", "--out", str(out)])
    (out / "last.pt").write_bytes((out / "best.pt").read_bytes())
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--epochs", "2", "--out", str(out), "--resume"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"cannot read {out / 'last.pt'}" in err and "not a training checkpoint (no config, " in err
    metrics = (out / "metrics.jsonl").read_text()
    (out / "metrics.jsonl").write_text('{"kind": "epoch", "epoch": 0}\n[1, 2]\n')
    with pytest.raises(CorruptRunFileError, match="metrics.jsonl.*record 2 is not a record of the trainer"):
        load_run(out)
    (out / "metrics.jsonl").write_text(metrics)
    (out / "provenance.json").write_text("null")
    with pytest.raises(CorruptRunFileError, match="provenance.json.*not a JSON object but NoneType"):
        RunDirectory(out).sessions()
    with pytest.raises(CorruptRunFileError, match="provenance.json"):
        load_run(out)


def test_code_version_names_the_commit_and_ignores_what_runs_write(tmp_path):
    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True)

    (tmp_path / "results" / "run").mkdir(parents=True)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "code.py").write_text("x = 1\n")
    (tmp_path / "results" / "run" / "metrics.jsonl").write_text("{}\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "start")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert code_version(tmp_path / "pkg") == {"git_commit": head, "git_dirty": False}
    (tmp_path / "results" / "run" / "metrics.jsonl").write_text('{"epoch": 1}\n')
    assert code_version(tmp_path / "pkg")["git_dirty"] is False  # a run's own files are not code
    (tmp_path / "pkg" / "code.py").write_text("x = 2\n")
    assert code_version(tmp_path / "pkg")["git_dirty"] is True


def test_code_version_outside_git_is_unknown(tmp_path):
    assert code_version(tmp_path) == {"git_commit": None, "git_dirty": None}
