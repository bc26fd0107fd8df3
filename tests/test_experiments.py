"""The paper's named runs: valid, complete, and the committed results map to them."""

import re
from pathlib import Path

import pytest

from organics.experiments import BAR_MARGIN, EXPERIMENTS, Experiment, TrainConfig, experiment_table
from organics.runs import load_model, load_run, summarize_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_every_experiment_is_a_valid_configuration_with_its_own_results_folder(name):
    experiment = EXPERIMENTS[name]
    assert experiment.name == name and experiment.description and experiment.paper
    cfg = experiment.config()
    assert isinstance(cfg, TrainConfig) and cfg.out_dir == experiment.out_dir
    assert experiment.out_dir.startswith("results/") and "out_dir" not in experiment.settings
    assert experiment.command() == f"python -m organics.train --experiment {name} --resume"


def test_results_folders_are_distinct_and_the_table_lists_every_experiment():
    folders = [e.out_dir for e in EXPERIMENTS.values()]
    assert len(set(folders)) == len(folders)
    table = experiment_table()
    assert all(name in table for name in EXPERIMENTS)


def test_overrides_apply_and_unknown_fields_are_refused():
    experiment = EXPERIMENTS["static/mlp"]
    cfg = experiment.config(epochs=2, limit_train=100, out_dir="runs/x")
    assert (cfg.epochs, cfg.limit_train, cfg.out_dir, cfg.model) == (2, 100, "runs/x", "mlp")
    with pytest.raises(ValueError, match="unknown"):
        experiment.config(epoch=2)
    with pytest.raises(TypeError):
        experiment.settings["epochs"] = 1  # type: ignore[index]


def test_the_bar_is_the_papers_value_less_the_margin_where_the_paper_has_one():
    assert BAR_MARGIN == 0.5
    assert EXPERIMENTS["smnist/organics-128"].bar == pytest.approx(97.3)  # spec section 4: 97.8 - 0.5
    assert EXPERIMENTS["psmnist/organics-128"].bar == pytest.approx(90.2)
    assert EXPERIMENTS["static/mlp"].paper_accuracy is None and EXPERIMENTS["static/mlp"].bar is None


def test_sequential_experiments_follow_the_papers_protocol():
    for name in ("smnist/organics-orthogonal-128", "smnist/lstm-128", "psmnist/organics-orthogonal-128"):
        cfg = EXPERIMENTS[name].config()
        assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.step_size, cfg.gamma) == (300, 256, 0.01, 30, 0.8)
        assert cfg.model_kwargs["hidden_size"] == 128


RESUMABLE = {"epochs", "resume", "progress", "device", "tf32", "out_dir", "data_root"}


@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS.values() if (ROOT / e.out_dir).is_dir()], ids=str)
def test_committed_results_were_made_by_their_experiment_and_load(experiment: Experiment):
    run = load_run(ROOT / experiment.out_dir)
    expected = experiment.config().asdict()
    saved = run.provenance["config"]
    assert {k: saved[k] for k in expected if k not in RESUMABLE} == {
        k: v for k, v in expected.items() if k not in RESUMABLE
    }
    summary = summarize_run(ROOT / experiment.out_dir)
    assert summary is not None and 1 <= summary.epochs_completed <= expected["epochs"]
    assert run.provenance["epochs_completed"] == summary.epochs_completed  # an unfinished run has provenance too
    model = load_model(ROOT / experiment.out_dir)
    if run.final is not None:
        assert sum(p.numel() for p in model.parameters()) == run.final["n_parameters"]


def test_docs_name_only_existing_experiments():
    for page in (ROOT / "README.md", ROOT / "book" / "reproducing.md"):
        for name in re.findall(r"--experiment\s+([\w-]+/[\w-]+)", page.read_text()):
            assert name in EXPERIMENTS, f"{page.name} names an unknown experiment {name!r}"
