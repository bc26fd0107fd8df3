"""The GitHub Actions workflows (they cannot run here): their triggers, permissions and commands.

`.github/workflows/publish.yml` builds the book on a release tag and deploys it to GitHub Pages;
`.github/workflows/linkcheck.yml` checks the book's external links every week. Every command
they run is one the README documents, and its programs and files exist in this checkout.
"""

import re
import shlex
import shutil

import pytest
import yaml
from book_pages import ROOT

WORKFLOWS = ROOT / ".github" / "workflows"
README = (ROOT / "README.md").read_text()
CI_VARIABLE = re.compile(r'"?\$\{?GITHUB_[A-Z_]+\}?"?')  # a value GitHub fills in (the tag, ...)


def load(name: str) -> dict:
    return yaml.safe_load((WORKFLOWS / name).read_text())


def triggers(workflow: dict) -> dict:
    """The `on:` mapping (YAML 1.1, which PyYAML reads, turns the bare key `on` into True)."""
    return workflow.get("on", workflow.get(True))


def steps(workflow: dict) -> list[dict]:
    return [step for job in workflow["jobs"].values() for step in job.get("steps", [])]


def run_commands(workflow: dict) -> list[str]:
    return [line.strip() for step in steps(workflow) for line in step.get("run", "").splitlines() if line.strip()]


def uses(workflow: dict) -> dict[str, dict]:
    """The actions a workflow uses, by name without version, with their `with:` inputs."""
    return {step["uses"].split("@")[0]: step.get("with", {}) for step in steps(workflow) if "uses" in step}


def readme_commands() -> list[str]:
    """The commands of the README's bash blocks (comments dropped)."""
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL)
    return [line.split("  #")[0].strip() for block in blocks for line in block.splitlines() if line.strip()]


WORKFLOW_FILES = pytest.mark.parametrize("name", ["publish.yml", "linkcheck.yml"])


def test_publish_runs_on_release_tags_and_deploys_the_html_to_pages():
    workflow = load("publish.yml")
    assert triggers(workflow) == {"push": {"tags": ["v*"]}}
    assert workflow["permissions"] == {"contents": "read"}, "the build reads the repository, nothing more"
    deploy = workflow["jobs"]["deploy"]
    assert deploy["needs"] == "build"
    assert deploy["permissions"] == {"pages": "write", "id-token": "write"}
    assert deploy["environment"]["name"] == "github-pages"
    assert "actions/deploy-pages" in uses(workflow)
    assert uses(workflow)["actions/upload-pages-artifact"] == {"path": "_build/html"}
    assert "bash install.sh" in run_commands(workflow)
    builds = [command for command in run_commands(workflow) if command.startswith("jupyter-book build")]
    assert builds == ["jupyter-book build . --all -W -n --keep-going"], "HTML into _build/html, warnings as errors"


def test_publish_builds_the_committed_results_without_retraining():
    """Full mode retrains (hours for static MNIST, days for Table 2 on a CPU): the published book is quick mode."""
    workflow = load("publish.yml")
    scopes = [workflow, *workflow["jobs"].values(), *steps(workflow)]
    assert not any("ORGANICS_MODE" in scope.get("env", {}) for scope in scopes)
    assert not any("ORGANICS_MODE" in command for command in run_commands(workflow))


def test_publish_checks_that_the_tag_is_the_release_of_the_colab_cell():
    workflow = load("publish.yml")
    assert 'python book/_ext/colab_cell.py --check --tag "$GITHUB_REF_NAME"' in run_commands(workflow)


def test_linkcheck_runs_weekly_and_on_demand():
    workflow = load("linkcheck.yml")
    on = triggers(workflow)
    assert set(on) == {"schedule", "workflow_dispatch"}
    (schedule,) = on["schedule"]
    minute, hour, day_of_month, month, day_of_week = schedule["cron"].split()
    assert (day_of_month, month) == ("*", "*") and re.fullmatch(r"[0-6]", day_of_week), "once a week"
    assert workflow["permissions"] == {"contents": "read"}
    assert "jupyter-book build . --builder linkcheck" in run_commands(workflow)


@WORKFLOW_FILES
def test_every_command_is_documented_in_the_readme(name):
    documented = readme_commands()
    for command in run_commands(load(name)):
        pattern = re.escape(CI_VARIABLE.sub("\0", command)).replace("\0", r"\S+")
        assert any(re.fullmatch(pattern, line) for line in documented), f"{name} runs `{command}`, not in the README"


@WORKFLOW_FILES
def test_every_command_exists_here(name):
    for command in run_commands(load(name)):
        program, *args = shlex.split(CI_VARIABLE.sub("TAG", command))
        assert shutil.which(program), f"{name}: `{program}` is not installed"
        if program in ("bash", "python") and args and not args[0].startswith("-"):
            assert (ROOT / args[0]).is_file(), f"{name}: {args[0]} does not exist"


@WORKFLOW_FILES
def test_jobs_use_the_projects_debian_python(name):
    for job_name, job in load(name)["jobs"].items():
        if any("run" in step for step in job.get("steps", [])):
            assert job.get("container") == "python:3.11-bookworm", f"{name}: job {job_name}"
            assert job.get("timeout-minutes"), f"{name}: job {job_name} has no time limit"
