"""Run directories read back: results tables take final-epoch and best-validation accuracies from them."""

import json
from pathlib import Path

import pytest

from organics.runs import RunDirectory, load_run, summarize_run

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
