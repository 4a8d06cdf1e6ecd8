"""A small team on one machine: workers train variants and push them to a shared DVC remote (S3
served by moto, an SSH server or a GCS emulator, all on 127.0.0.1, or a directory), and other clones
get every result without training."""

import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import boto3
import pytest
import yaml

from cifar_archives import make_archive
from support import interrupt_at, session_processes, tiny_params

PROJECT = Path(__file__).resolve().parents[1]
BUCKET = "team"
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"  # sshd must be started by its absolute path
# dvc and python -m resnet_cifar.team, for the test's own commands and the workers'
ENVIRONMENT = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

pytestmark = pytest.mark.slow


def sh(repo: Path, *args: str, env: dict | None = None, ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=repo, capture_output=True, text=True, env=env or ENVIRONMENT)
    if ok:
        assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def team(repo: Path, *args: str, env: dict | None = None, ok: bool = True) -> subprocess.CompletedProcess:
    return sh(repo, sys.executable, "-m", "resnet_cifar.team", *args, env=env, ok=ok)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve(command: list[str], port: int, **popen) -> subprocess.Popen:
    """Start a server and wait until it accepts connections on 127.0.0.1:`port`."""
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, f"{command[0]} did not start"
            time.sleep(0.2)


def stop(server: subprocess.Popen) -> None:
    server.kill()
    server.wait()


@pytest.fixture(scope="module")
def s3():
    """A local S3 API server that checks credentials, with a bucket and a worker allowed to use it."""
    port = free_port()
    # The first requests (the set-up below) need no credentials; every later one does.
    server = serve([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], port,
                   env=os.environ | {"INITIAL_NO_AUTH_ACTION_COUNT": "4"})
    url = f"http://127.0.0.1:{port}"
    anyone = {"endpoint_url": url, "region_name": "us-east-1", "aws_access_key_id": "setup",
              "aws_secret_access_key": "setup"}
    boto3.client("s3", **anyone).create_bucket(Bucket=BUCKET)
    iam = boto3.client("iam", **anyone)
    iam.create_user(UserName="worker")
    key = iam.create_access_key(UserName="worker")["AccessKey"]
    iam.put_user_policy(UserName="worker", PolicyName="bucket", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    credentials = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    try:
        yield server, url, credentials
    finally:
        stop(server)


def make_origin(root: Path, *remote: list[str], variants: tuple[str, ...] = ("small", "deep")) -> Path:
    """A bare git repository holding the tiny project (with `variants`), with `remote`'s dvc commands applied."""
    project = root / "project"
    project.mkdir()
    for name in ("dvc.yaml", "src"):
        source = PROJECT / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, project / name)
    params = tiny_params()
    params["variants"] = {name: params["variants"][name] for name in variants}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for command in (["git", "init", "-q", "-b", "main"], ["git", "config", "user.email", "t@example.com"],
                    ["git", "config", "user.name", "t"], ["dvc", "init", "-q"], *remote,
                    ["git", "add", "-A"], ["git", "commit", "-qm", "project"]):
        sh(project, *command)
    sh(root, "git", "clone", "-q", "--bare", str(project), str(root / "origin.git"))
    return root / "origin.git"


def without_source(env: dict) -> dict:
    """`env` with no CIFAR source: a clone that must not download (or train) anything."""
    return {key: value for key, value in env.items() if not key.startswith("CIFAR_")}


def clone(origin: Path, path: Path) -> Path:
    sh(origin.parent, "git", "clone", "-q", str(origin), str(path))
    sh(path, "git", "config", "user.email", "t@example.com")
    sh(path, "git", "config", "user.name", "t")
    return path


@pytest.fixture(scope="module")
def environment(tmp_path_factory):
    """Workers' environment: the generated archive as the CIFAR source."""
    archive = make_archive(tmp_path_factory.mktemp("mirror"), "cifar-10-binary", n_train=100, n_test=50)
    return ENVIRONMENT | {"CIFAR_SOURCE": str(archive.path), "CIFAR_MEMBER_MD5S": str(archive.md5s_path)}


@pytest.fixture(scope="module")
def pushed(tmp_path_factory, s3, environment):
    """Worker A trains `small`; worker B is killed mid-training, finishes, has its push cut off while
    the remote hangs, and repeats it. Both push to S3; neither commits anything to git."""
    server, url, credentials = s3
    root = tmp_path_factory.mktemp("team")
    origin = make_origin(root, ["dvc", "remote", "add", "-d", "team", f"s3://{BUCKET}/cache"],
                         ["dvc", "remote", "modify", "team", "endpointurl", url])
    worker = environment | credentials
    a, b = clone(origin, root / "a"), clone(origin, root / "b")
    team(a, "train", "small", env=worker)

    killed = interrupt_at(["dvc", "repro", "train@deep"], "[deep] epoch 1/", cwd=b, env=worker)
    assert killed.returncode == -signal.SIGKILL
    sh(b, "dvc", "repro", "train@deep", env=worker)  # resumes from its checkpoint
    server.send_signal(signal.SIGSTOP)  # the remote hangs mid-push
    try:
        cut_off = subprocess.Popen(["dvc", "push", "--run-cache", "--with-deps", "train@deep"], cwd=b, env=worker,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(3)
        assert cut_off.poll() is None
        cut_off.kill()
        cut_off.wait()
    finally:
        server.send_signal(signal.SIGCONT)
    repeated = team(b, "train", "deep", env=worker)
    assert "Running stage" not in repeated.stdout  # trained already: only the push is repeated
    return origin, a, b, worker


def test_a_clone_gets_every_workers_result_without_training(pushed, tmp_path):
    origin, a, b, worker = pushed
    c = clone(origin, tmp_path / "c")
    no_source = without_source(worker)
    assert_pulls_without_training(c, no_source, {"small": a, "deep": b})
    for variant, worker_clone in (("small", a), ("deep", b)):
        evaluation = json.loads((c / f"metrics/variants/{variant}/evaluate.json").read_text())
        timing = json.loads((worker_clone / f"metrics/variants/{variant}/train_time.json").read_text())
        assert evaluation["train_time"]["train_seconds"] == timing["train_seconds"]
    assert "| small | dense |" in (c / "metrics/report.md").read_text()

    # The results committed (dvc.lock, evaluations, report): a clone of them runs nothing at all.
    sh(c, "git", "add", "-A")
    sh(c, "git", "commit", "-qm", "results")
    sh(c, "git", "push", "-q", "origin", "HEAD:main")
    d = clone(origin, tmp_path / "d")
    pulled = sh(d, "dvc", "repro", "--pull", env=no_source).stdout
    assert "Running stage" not in pulled, pulled
    assert (d / "models/deep.keras").read_bytes() == (b / "models/deep.keras").read_bytes()
    assert "Data and pipelines are up to date" in sh(d, "dvc", "status", env=no_source).stdout


def assert_pulls_without_training(repo: Path, env: dict, trained_by: dict[str, Path]) -> None:
    """The README's `dvc repro --pull` in `repo` restores each variant of `trained_by` from the remote,
    byte-equal to its worker's, downloads and trains nothing, and leaves `dvc status` clean."""
    pulled = sh(repo, "dvc", "repro", "--pull", env=env).stdout
    assert "Running stage 'train@" not in pulled and "Running stage 'download'" not in pulled
    for variant, worker in trained_by.items():
        assert f"Stage 'train@{variant}' is cached - skipping run" in pulled
        for output in (f"models/{variant}.keras", f"metrics/variants/{variant}/train/metrics.json",
                       f"metrics/variants/{variant}/train_time.json"):
            assert (repo / output).read_bytes() == (worker / output).read_bytes(), output
    assert "Data and pipelines are up to date" in sh(repo, "dvc", "status", env=env).stdout


def test_collect_trains_nothing_that_the_remote_lacks(pushed, tmp_path):
    origin, _, _, worker = pushed
    d = clone(origin, tmp_path / "d")
    params = yaml.safe_load((d / "params.yaml").read_text())
    params["variants"]["wide"] = {"widths": [32]}  # a variant no worker has trained
    (d / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    collected = team(d, "collect", env=worker, ok=False)
    assert collected.returncode == 1
    assert collected.stderr.strip().endswith(
        f"error: remote 'team' (s3://{BUCKET}/cache) holds no run of train@wide for this code, data and params; "
        "train it first: python -m resnet_cifar.team train <variant>")
    assert "Running stage 'train@" not in collected.stdout
    assert not (d / "models/wide.keras").exists()
    assert (d / "models/small.keras").is_file()  # what the remote has is restored


@pytest.mark.parametrize("fault", ["unreachable", "wrong credentials"])
def test_a_remote_that_does_not_answer_stops_a_worker_before_it_trains(pushed, tmp_path, fault):
    origin, _, _, worker = pushed
    e = clone(origin, tmp_path / "e")
    if fault == "unreachable":
        sh(e, "dvc", "remote", "modify", "--local", "team", "endpointurl", f"http://127.0.0.1:{free_port()}")
    else:
        worker = worker | {"AWS_SECRET_ACCESS_KEY": "not-the-key"}
    assert_stops_before_training(e, worker, f"s3://{BUCKET}/cache")


def assert_stops_before_training(repo: Path, env: dict, url: str) -> None:
    """`team train` in `repo` fails at once with one error naming the remote, and writes nothing."""
    started = time.monotonic()
    trained = team(repo, "train", "small", env=env, ok=False)
    assert trained.returncode == 1
    message = trained.stderr.strip().splitlines()
    assert message[0].startswith(f"error: remote 'team' ({url}): `dvc fetch --run-cache` failed: ")
    assert message[-1].startswith("Check that the remote is reachable and your credentials for it")
    assert time.monotonic() - started < 120
    written = [path for folder in ("models", "data") for path in (repo / folder).rglob("*")
               if path.is_file() and path.name != ".gitignore"]
    assert written == []  # nothing ran
    assert sh(repo, "git", "status", "--porcelain").stdout == ""


def test_an_experiment_travels_between_clones_with_its_data(tmp_path, environment):
    """`dvc exp push` / `dvc exp pull` through a bare git repository and a directory remote."""
    origin = make_origin(tmp_path, ["dvc", "remote", "add", "-d", "team", str(tmp_path / "shared-drive")],
                         variants=("small",))
    first, second = clone(origin, tmp_path / "first"), clone(origin, tmp_path / "second")
    sh(first, "dvc", "exp", "run", "-n", "wider", "-S", "variants.small.widths=[24]", env=environment)
    sh(first, "dvc", "exp", "push", "origin", "wider", env=environment)

    no_source = without_source(environment)
    sh(second, "dvc", "exp", "pull", "origin", "wider", env=no_source)
    sh(second, "dvc", "exp", "apply", "wider", env=no_source)
    assert yaml.safe_load((second / "params.yaml").read_text())["variants"]["small"]["widths"] == [24]
    for output in ("models/small.keras", "metrics/variants/small/train/metrics.json"):
        assert (second / output).read_bytes() == (first / output).read_bytes(), output  # the run's own files
    shown = json.loads(sh(second, "dvc", "exp", "show", "--json", env=no_source).stdout)
    names = [exp["revs"][0]["name"] for row in shown for exp in row.get("experiments") or []]
    assert "wider" in names


class Remote(NamedTuple):
    """A team's remote as the tests use it: the `dvc` commands committed to set it up, the ones
    each clone runs for itself (`--local`, not committed), and the environment its users need."""
    url: str
    setup: list[list[str]]
    local: list[list[str]]
    env: dict


def new_key(path: Path) -> None:
    """An ed25519 key pair without passphrase: `path` and `path`.pub."""
    sh(path.parent, "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path))


@pytest.fixture(scope="module")
def ssh(tmp_path_factory):
    """An SSH server on 127.0.0.1 that lets in one key; a home whose ~/.ssh has that key and knows the server."""
    if not Path(SSHD).is_file():
        pytest.skip(f"no {SSHD} (Debian's openssh-server; .ci/run installs it)")
    root = tmp_path_factory.mktemp("ssh")
    home = root / "home"
    (home / ".ssh").mkdir(parents=True)
    key = home / ".ssh" / "id_ed25519"
    for path in (root / "host_key", key):
        new_key(path)
    shutil.copy(key.with_suffix(".pub"), root / "authorized_keys")
    port = free_port()
    (root / "sshd_config").write_text(f"""ListenAddress 127.0.0.1
Port {port}
HostKey {root / "host_key"}
AuthorizedKeysFile {root / "authorized_keys"}
PidFile {root / "sshd.pid"}
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
""")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    server = serve([SSHD, "-D", "-e", "-f", str(root / "sshd_config")], port)
    host_key = " ".join((root / "host_key.pub").read_text().split()[:2])
    (home / ".ssh" / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key}\n")
    url = f"ssh://{getpass.getuser()}@127.0.0.1:{port}{root / 'store'}"
    try:
        yield Remote(url, [["dvc", "remote", "add", "-d", "team", url]],
                     [["dvc", "remote", "modify", "--local", "team", "keyfile", str(key)]],
                     {"HOME": str(home)})
    finally:
        stop(server)


@pytest.fixture(scope="module")
def gcs():
    """A Google Cloud Storage emulator on 127.0.0.1 with the team's bucket (it checks no credentials)."""
    port = free_port()
    server = serve([str(Path(sys.executable).parent / "gcp-storage-emulator"), "start", "--host", "127.0.0.1",
                    "--port", str(port), "--in-memory", "--default-bucket", BUCKET], port)
    url = f"gs://{BUCKET}/cache"
    try:
        yield Remote(url, [["dvc", "remote", "add", "-d", "team", url],
                           ["dvc", "remote", "modify", "team", "endpointurl", f"http://127.0.0.1:{port}"],
                           ["dvc", "remote", "modify", "team", "allow_anonymous_login", "true"]],
                     [], {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"})  # else gcsfs asks Google's API, not the emulator
    finally:
        stop(server)


@pytest.mark.parametrize("kind", ["ssh", "gcs"])
def test_a_clone_gets_a_workers_result_through_an_ssh_or_gcs_remote(kind, request, tmp_path, environment):
    """The S3 round trip, one variant, through DVC's SSH and GCS plugins."""
    remote = request.getfixturevalue(kind)
    origin = make_origin(tmp_path, *remote.setup, variants=("small",))
    worker, c = clone(origin, tmp_path / "worker"), clone(origin, tmp_path / "c")
    for repo in (worker, c):
        for command in remote.local:
            sh(repo, *command)
    team(worker, "train", "small", env=environment | remote.env)
    assert_pulls_without_training(c, without_source(environment) | remote.env, {"small": worker})


def test_a_key_the_ssh_server_refuses_stops_a_worker_before_it_trains(ssh, tmp_path, environment):
    origin = make_origin(tmp_path, *ssh.setup, variants=("small",))
    stranger = clone(origin, tmp_path / "stranger")
    new_key(tmp_path / "other_key")
    sh(stranger, "dvc", "remote", "modify", "--local", "team", "keyfile", str(tmp_path / "other_key"))
    assert_stops_before_training(stranger, environment | ssh.env, ssh.url)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from Linux's /proc")
def test_a_worker_asked_to_stop_leaves_no_process_training(tmp_path, environment):
    """SIGTERM to `python -m resnet_cifar.team train` alone, while the `dvc repro` it started
    trains: the worker, dvc and the stage end within seconds, with exit code 130."""
    origin = make_origin(tmp_path, ["dvc", "remote", "add", "-d", "team", str(tmp_path / "remote")])
    worker = clone(origin, tmp_path / "worker")
    params = yaml.safe_load((worker / "params.yaml").read_text())
    params["variants"]["deep"]["epochs"] = 10_000  # trains until it is stopped
    (worker / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    process = subprocess.Popen([sys.executable, "-m", "resnet_cifar.team", "train", "deep"], cwd=worker,
                               env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    printed = []
    for line in process.stdout:
        printed.append(line)
        if line.startswith("[deep] epoch 2/"):
            break
    else:
        raise AssertionError("the worker ended without training:\n" + "".join(printed))
    process.send_signal(signal.SIGTERM)
    printed.append(process.communicate(timeout=30)[0])
    assert process.returncode == 130, "".join(printed)
    deadline = time.monotonic() + 10
    while session_processes(process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not session_processes(process.pid), "".join(printed)
