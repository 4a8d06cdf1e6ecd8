"""Training spread over machines that share a DVC remote: the steps of the CI training workflow.

    python -m resnet_cifar.team remote             the default DVC remote, or what to configure
    python -m resnet_cifar.team variants           the variants of params.yaml, as a JSON list
    python -m resnet_cifar.team train VARIANT      train one variant (or restore it), push it to the remote
    python -m resnet_cifar.team collect            restore every variant from the remote without
                                                   training any, then evaluate them and build the report

A worker pushes its run with the run-cache entry that DVC keeps for it (which code, data and params
made which outputs), so any clone that pulls the entry gets the outputs instead of running the stage.
Every command needs a default DVC remote (`dvc remote add -d team <url>`), and checks that it
answers before doing anything long.
"""

import json
import subprocess

from resnet_cifar.params import load_params, variant_spec
from resnet_cifar.stage import StageError, run

USAGE = "usage: python -m resnet_cifar.team remote | variants | train VARIANT | collect"


def default_remote() -> str:
    """'name (url)' of the project's default remote."""
    asked = subprocess.run(["dvc", "remote", "default"], capture_output=True, text=True)
    name = asked.stdout.strip()
    if asked.returncode != 0 or not name:  # DVC 3 says "No default remote set" and exits 1
        raise StageError("no default DVC remote: add the team's with `dvc remote add -d team <url>` "
                         "(README, Scaling out)")
    url = subprocess.run(["dvc", "config", f"remote.{name}.url"], capture_output=True, text=True).stdout.strip()
    return f"'{name}' ({url})"


def transfer(remote: str, *args: str) -> None:
    """A dvc command that talks to the remote; its failure names the remote and DVC's reason."""
    result = subprocess.run(["dvc", *args], capture_output=True, text=True)
    if result.returncode != 0:
        reason = [line for line in result.stderr.splitlines() if line.startswith("ERROR")] or ["(no message)"]
        raise StageError(f"remote {remote}: `dvc {' '.join(args)}` failed: {reason[-1].removeprefix('ERROR: ')}\n"
                         "Check that the remote is reachable and your credentials for it (README, Scaling out); "
                         "nothing was changed in the workspace, and a repeated command resumes the transfer.")


def reproduce(*targets: str) -> None:
    """`dvc repro --pull`: each stage is restored from the remote when it holds a run of it."""
    if subprocess.run(["dvc", "repro", "--pull", *targets]).returncode != 0:
        raise StageError(f"`dvc repro --pull {' '.join(targets)}` failed (see its message above)")


def train(variant: str) -> None:
    variant_spec(load_params(), variant)  # an unknown or invalid variant fails here, before any transfer
    remote = default_remote()
    transfer(remote, "fetch", "--run-cache")  # answers before an hour of training, not after
    reproduce(f"train@{variant}")
    transfer(remote, "push", "--run-cache", "--with-deps", f"train@{variant}")
    print(f"pushed train@{variant} and its run-cache entry to remote {remote}")


def not_restorable() -> list[str]:
    """The train stages that the remote cannot restore (after checking out those it can)."""
    from dvc.repo import Repo
    from dvc.stage.cache import RunCacheNotFoundError

    missing = []
    with Repo() as repo, repo.lock:
        for stage in repo.index.stages:
            if stage.name.startswith("train@"):
                try:
                    repo.stage_cache.restore(stage, pull=True)
                except RunCacheNotFoundError:
                    missing.append(stage.addressing)
    return missing


def collect() -> None:
    remote = default_remote()
    transfer(remote, "fetch", "--run-cache")
    reproduce("prepare")  # the data the train stages' run-cache entries are keyed on
    missing = not_restorable()
    if missing:
        raise StageError(f"remote {remote} holds no run of {', '.join(missing)} for this code, data and "
                         "params; train it first: python -m resnet_cifar.team train <variant>")
    reproduce()


def main(argv: list[str]) -> None:
    match argv:
        case ["remote"]:
            print(f"default DVC remote: {default_remote()}")
        case ["variants"]:
            print(json.dumps(list(load_params()["variants"])))
        case ["train", variant]:
            train(variant)
        case ["collect"]:
            collect()
        case _:
            raise StageError(USAGE)


if __name__ == "__main__":
    run(main)
