"""The download stage on small generated archives in all four official formats, and on real CIFAR-10."""

import functools
import os
import subprocess
import sys
import gzip
import http.server
import pickle
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from cifar_archives import FORMATS, Archive, make_archive
from support import tiny_params
from resnet_cifar import datasets, download, paths, prepare
from resnet_cifar.params import ParamsError
from resnet_cifar.stage import StageError

# The real CIFAR-10 where the environment names it (as the pipeline reads it: an archive, its
# directory or a URL), read before the tests' own settings replace it.
REAL_SOURCE = os.environ.get("CIFAR_SOURCE")


@pytest.fixture(autouse=True)
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project directory as cwd, with params.yaml for cifar10 and no source settings inherited."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CIFAR_SOURCE", raising=False)
    monkeypatch.delenv("CIFAR_MEMBER_MD5S", raising=False)
    monkeypatch.setattr(download, "RETRY_DELAYS_S", (0, 0))
    # Downloads go to a private temporary directory; keep it where the tests can see it is emptied.
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    write_params("cifar10")
    return tmp_path


def write_params(dataset: str) -> None:
    Path("params.yaml").write_text(yaml.safe_dump(tiny_params(dataset)))


def use(archive: Archive, monkeypatch: pytest.MonkeyPatch, source: str | None = None) -> None:
    """Point the stage at `archive` (or `source`) and make it accept the archive's member md5s."""
    monkeypatch.setenv("CIFAR_SOURCE", source or str(archive.path))
    monkeypatch.setenv("CIFAR_MEMBER_MD5S", str(archive.md5s_path))


def dataset_of(fmt: str) -> str:
    return "cifar100" if fmt.startswith("cifar-100") else "cifar10"


def downloaded(fmt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Archive:
    """A generated archive of `fmt`, which the download stage has read."""
    write_params(dataset_of(fmt))
    archive = make_archive(tmp_path, fmt)
    use(archive, monkeypatch)
    download.main([])
    return archive


def assert_nothing_written() -> None:
    raw = Path("data/raw")
    assert not raw.exists() or not any(raw.iterdir()), list(raw.iterdir())
    assert not any(Path("tmp").iterdir()), list(Path("tmp").iterdir())


def fail(*words: str) -> str:
    """Run the stage, expecting a DataError whose message holds every one of `words`."""
    with pytest.raises(StageError) as err:
        download.main([])
    for word in words:
        assert word in str(err.value), f"{word!r} not in: {err.value}"
    assert_nothing_written()
    return str(err.value)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A local HTTP server: its base URL and the directory it serves."""
    served = tmp_path / "served"
    served.mkdir()

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(QuietHandler, directory=served)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", served
    httpd.shutdown()
    httpd.server_close()


# --- every format -------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_writes_arrays_labels_and_classes_in_official_order(fmt: str, tmp_path: Path, monkeypatch) -> None:
    archive = downloaded(fmt, tmp_path, monkeypatch)

    raw = datasets.load_raw(paths.raw_path(dataset_of(fmt)))
    for key in ("x_train", "y_train", "x_test", "y_test"):
        assert raw[key].dtype == np.uint8
        np.testing.assert_array_equal(raw[key], getattr(archive, key), err_msg=key)
    assert raw["x_train"].shape == (50, 32, 32, 3) and raw["x_test"].shape == (10, 32, 32, 3)
    assert raw["classes"].tolist() == archive.classes
    if fmt.startswith("cifar-100"):
        np.testing.assert_array_equal(raw["y_train_coarse"], archive.y_train_coarse)
        np.testing.assert_array_equal(raw["y_test_coarse"], archive.y_test_coarse)
        assert raw["coarse_classes"].tolist() == archive.coarse_classes
    else:
        assert raw["classes"][0] == "airplane" and "y_train_coarse" not in raw
    assert [p.name for p in Path("data/raw").iterdir()] == [f"{dataset_of(fmt)}.npz"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_pixels_are_hwc_of_the_official_chw_planes(fmt: str, tmp_path: Path, monkeypatch) -> None:
    """Read the first training record straight from the archive, as the CIFAR page documents it."""
    archive = downloaded(fmt, tmp_path, monkeypatch)
    first_member = sorted(name for name in archive.md5s if "test" not in name)[0]
    with tarfile.open(archive.path) as tar:
        member = tar.extractfile(first_member).read()
    if fmt.endswith("python"):
        record = pickle.loads(member)[b"data"][0]
    else:  # 1 (CIFAR-10) or 2 (CIFAR-100: coarse, fine) label bytes before the pixels
        label_bytes = 2 if fmt.startswith("cifar-100") else 1
        record = np.frombuffer(member[label_bytes:label_bytes + 3072], dtype=np.uint8)
        assert datasets.load_raw(paths.raw_path(dataset_of(fmt)))["y_train"][0] == member[label_bytes - 1]
    x = datasets.load_raw(paths.raw_path(dataset_of(fmt)))["x_train"]
    for channel, row, col in [(0, 0, 1), (1, 31, 0), (2, 5, 7), (2, 31, 31)]:
        assert x[0, row, col, channel] == record[channel * 1024 + row * 32 + col]


# --- sources ------------------------------------------------------------------------------------

def test_directory_source_prefers_the_python_version(tmp_path: Path, monkeypatch, capsys) -> None:
    python = make_archive(tmp_path, "cifar-10-python")
    make_archive(tmp_path, "cifar-10-binary")
    use(python, monkeypatch, source=str(tmp_path))
    download.main([])
    assert f"source: {python.path}" in capsys.readouterr().out


def test_file_url_source(tmp_path: Path, monkeypatch) -> None:
    archive = make_archive(tmp_path, "cifar-10-binary")
    use(archive, monkeypatch, source=archive.path.as_uri())
    download.main([])
    assert Path("data/raw/cifar10.npz").is_file()


def test_downloads_from_a_mirror_directory_url_with_progress(server, monkeypatch, capsys) -> None:
    base_url, served = server
    archive = make_archive(served, "cifar-10-python")
    use(archive, monkeypatch, source=base_url)
    download.main([])
    out, err = capsys.readouterr()
    assert f"source: {base_url}cifar-10-python.tar.gz" in out
    assert "download:" in err and "(100%)" in err and "MB" in err
    assert "warning: CIFAR_MEMBER_MD5S" in err
    assert Path("data/raw/cifar10.npz").is_file()
    assert not any(Path("tmp").iterdir())  # the download was deleted


def test_interrupted_download_leaves_nothing(server, monkeypatch) -> None:
    base_url, served = server
    archive = make_archive(served, "cifar-10-python")
    use(archive, monkeypatch, source=base_url)

    def interrupt_midway(response, out, total: int) -> None:
        out.write(response.read(total // 2))
        raise KeyboardInterrupt

    monkeypatch.setattr(download, "_copy_with_progress", interrupt_midway)
    with pytest.raises(KeyboardInterrupt):
        download.main([])
    assert_nothing_written()


def test_official_url_checks_the_archive_md5(server, monkeypatch, capsys) -> None:
    base_url, served = server
    archive = make_archive(served, "cifar-10-python")
    archive_md5 = download.md5_of_file(archive.path)
    monkeypatch.setattr(download, "OFFICIAL_URL_BASE", base_url)
    monkeypatch.setenv("CIFAR_MEMBER_MD5S", str(archive.md5s_path))

    monkeypatch.setattr(download, "OFFICIAL_ARCHIVE_MD5S", {"cifar-10-python.tar.gz": archive_md5})
    download.main([])
    assert f"archive md5 {archive_md5} ok" in capsys.readouterr().out

    Path("data/raw/cifar10.npz").unlink()
    monkeypatch.setattr(download, "OFFICIAL_ARCHIVE_MD5S", {"cifar-10-python.tar.gz": "0" * 32})
    fail("cifar-10-python.tar.gz", "archive md5 mismatch", f"expected {'0' * 32}", f"got {archive_md5}")


def test_runs_as_a_module_with_the_md5_override_in_the_environment(tmp_path: Path) -> None:
    """As under `dvc repro`: a subprocess, configured only by environment variables."""
    archive = make_archive(tmp_path, "cifar-10-binary")
    env = os.environ | {"CIFAR_SOURCE": str(archive.path), "CIFAR_MEMBER_MD5S": str(archive.md5s_path)}
    command = [sys.executable, "-m", "resnet_cifar.download"]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "warning: CIFAR_MEMBER_MD5S" in done.stderr and "wrote data/raw/cifar10.npz" in done.stdout

    archive.path.write_bytes(b"garbage")
    failed = subprocess.run(command, env=env, capture_output=True, text=True)
    assert failed.returncode == 1 and failed.stderr.startswith("error: ") and "not a gzip file" in failed.stderr
    assert Path("data/raw/cifar10.npz").is_file()  # the previous output is untouched


# --- failures: one clear message, nothing left behind -------------------------------------------

def test_bad_params_fail_before_any_data_is_touched(monkeypatch) -> None:
    write_params("cifar1000")
    monkeypatch.setenv("CIFAR_SOURCE", "/nonexistent")
    with pytest.raises(ParamsError, match="data.dataset"):
        download.main([])
    assert_nothing_written()


def test_member_md5_mismatch_against_the_official_table(tmp_path: Path, monkeypatch) -> None:
    archive = make_archive(tmp_path, "cifar-10-python")
    monkeypatch.setenv("CIFAR_SOURCE", str(archive.path))
    member = "cifar-10-batches-py/data_batch_1"
    fail(str(archive.path), f"member {member}", "md5 mismatch",
         "expected c99cafc152244af753f735de768cd75f", f"got {archive.md5s[member]}")


def test_cifar100_binary_without_md5s_is_checked_by_size(tmp_path: Path, monkeypatch) -> None:
    write_params("cifar100")
    archive = make_archive(tmp_path, "cifar-100-binary")
    monkeypatch.setenv("CIFAR_SOURCE", str(archive.path))
    fail("cifar-100-binary/train.bin", "expected 153,700,000 bytes", f"found {50 * 3074:,}")


def test_truncated_archive(tmp_path: Path, monkeypatch) -> None:
    archive = make_archive(tmp_path, "cifar-10-binary")
    archive.path.write_bytes(archive.path.read_bytes()[: archive.path.stat().st_size // 2])
    use(archive, monkeypatch)
    fail(str(archive.path), "truncated", "expected a complete")


def test_not_a_gzip_file(tmp_path: Path, monkeypatch) -> None:
    archive = make_archive(tmp_path, "cifar-10-binary")
    archive.path.write_bytes(b"PK\x03\x04 a zip file")
    use(archive, monkeypatch)
    fail(str(archive.path), "not a gzip file", "expected", "1f 8b", "found 50 4b")


def test_gzip_that_is_not_a_tar(tmp_path: Path, monkeypatch) -> None:
    archive = make_archive(tmp_path, "cifar-10-binary")
    archive.path.write_bytes(gzip.compress(b"not a tar " * 100))
    use(archive, monkeypatch)
    fail(str(archive.path), "not a tar.gz")


def test_archive_of_the_other_dataset(tmp_path: Path, monkeypatch) -> None:
    write_params("cifar100")
    archive = make_archive(tmp_path, "cifar-10-binary")
    use(archive, monkeypatch)
    fail(str(archive.path), "not a cifar100 archive", "cifar-100-python/", "found cifar-10-batches-bin")


def test_missing_member(tmp_path: Path, monkeypatch) -> None:
    archive = make_archive(tmp_path, "cifar-10-binary",
                           replace={"cifar-10-batches-bin/data_batch_3.bin": None})
    use(archive, monkeypatch)
    fail(str(archive.path), "cifar-10-batches-bin/data_batch_3.bin missing", "expected")


def test_record_size_not_a_multiple(tmp_path: Path, monkeypatch) -> None:
    archive = make_archive(tmp_path, "cifar-10-binary",
                           replace={"cifar-10-batches-bin/data_batch_2.bin": bytes(3073 * 2 + 5)})
    use(archive, monkeypatch)
    fail(str(archive.path), "data_batch_2.bin", "6,151 bytes", "3073-byte record")


def test_pickled_labels_do_not_match_images(tmp_path: Path, monkeypatch) -> None:
    broken = pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [1, 2, 3]})
    archive = make_archive(tmp_path, "cifar-10-python", replace={"cifar-10-batches-py/test_batch": broken})
    use(archive, monkeypatch)
    fail(str(archive.path), "cifar-10-batches-py/test_batch", "expected 4 labels", "found 3")


def test_pickles_may_not_run_code(tmp_path: Path, monkeypatch) -> None:
    evil = pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [print]})
    archive = make_archive(tmp_path, "cifar-10-python", replace={"cifar-10-batches-py/test_batch": evil})
    use(archive, monkeypatch)
    fail("cifar-10-batches-py/test_batch", "refusing to load builtins.print")


def test_missing_source_path(monkeypatch) -> None:
    monkeypatch.setenv("CIFAR_SOURCE", "/nonexistent/cifar.tar.gz")
    fail("CIFAR_SOURCE=/nonexistent/cifar.tar.gz", "no such file or directory", "expected")


def test_directory_without_an_official_archive(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("CIFAR_SOURCE", str(tmp_path / "empty"))
    fail(str(tmp_path / "empty"), "none of the official archive names",
         "cifar-10-python.tar.gz or cifar-10-binary.tar.gz")


def test_unreachable_url_says_how_to_work_offline(monkeypatch) -> None:
    monkeypatch.setenv("CIFAR_SOURCE", "http://127.0.0.1:9/")
    fail("http://127.0.0.1:9/cifar-10-python.tar.gz", "download failed after 3 attempts", "set CIFAR_SOURCE")


def test_http_error(server, monkeypatch) -> None:
    base_url, _ = server
    monkeypatch.setenv("CIFAR_SOURCE", base_url + "missing.tar.gz")
    fail(f"{base_url}missing.tar.gz", "HTTP error 404", "expected 200")


def test_unreadable_md5_override(tmp_path: Path, monkeypatch) -> None:
    archive = make_archive(tmp_path, "cifar-10-binary")
    use(archive, monkeypatch)
    archive.md5s_path.write_text("{not json")
    fail(f"CIFAR_MEMBER_MD5S={archive.md5s_path}", "expected a JSON file")


# --- load_raw -----------------------------------------------------------------------------------

@pytest.mark.parametrize("content", [None, b"", b"PK\x03\x04 truncated"],
                         ids=["missing", "empty", "truncated"])
def test_load_raw_says_to_rerun_the_stage(content: bytes | None, tmp_path: Path) -> None:
    path = tmp_path / "cifar10.npz"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(datasets.DataError, match="run `dvc repro -f download`") as err:
        datasets.load_raw(path)
    assert str(path) in str(err.value)


def test_load_raw_rejects_an_npz_without_the_arrays(tmp_path: Path) -> None:
    np.savez(tmp_path / "other.npz", x_train=np.zeros(1))
    with pytest.raises(datasets.DataError, match="lacks arrays y_train, x_test, y_test, classes"):
        datasets.load_raw(tmp_path / "other.npz")


# --- the real CIFAR-10 --------------------------------------------------------------------------

@pytest.mark.skipif(REAL_SOURCE is None, reason="CIFAR_SOURCE is not set: set it to the official CIFAR-10 archive "
                                                 "(or its directory, or a URL) to test on the real data")
def test_real_cifar10_download_and_prepare(monkeypatch, capsys) -> None:
    monkeypatch.setenv("CIFAR_SOURCE", REAL_SOURCE)
    download.main([])
    out, err = capsys.readouterr()
    assert "CIFAR_MEMBER_MD5S" not in err
    checked = [f"{member}: md5 {md5} ok (official)" for member, md5 in download.OFFICIAL_MEMBER_MD5S.items()
               if member.startswith("cifar-10-")]
    assert sum(line in out for line in checked) == 6  # the five training batches and the test batch

    raw = datasets.load_raw(Path("data/raw/cifar10.npz"))
    assert raw["x_train"].shape == (50_000, 32, 32, 3) and raw["x_train"].dtype == np.uint8
    assert raw["x_test"].shape == (10_000, 32, 32, 3) and raw["x_test"].dtype == np.uint8
    assert np.bincount(raw["y_train"]).tolist() == [5_000] * 10
    assert np.bincount(raw["y_test"]).tolist() == [1_000] * 10
    assert raw["classes"][0] == "airplane" and len(raw["classes"]) == 10

    prepare.main([])
    prepared = datasets.load_prepared()
    assert prepared["x_train"].shape == (50_000, 32, 32, 3) and prepared["x_train"].dtype == np.float32
    assert prepared["x_train"].min() == 0.0 and prepared["x_train"].max() == 1.0
    assert prepared["x_test"][0, 0, 0, 0] == raw["x_test"][0, 0, 0, 0] / np.float32(255)
    assert prepared["y_train"].shape == (50_000, 10) and prepared["y_test"].shape == (10_000, 10)
    np.testing.assert_array_equal(prepared["y_train"].argmax(axis=1), raw["y_train"])
    assert prepared["classes"][0] == "airplane"
