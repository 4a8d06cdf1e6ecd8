"""Stage `download`: fetch the official CIFAR archive of `data.dataset` and write data/raw/<dataset>.npz.

The archive comes from the environment variable CIFAR_SOURCE when it is set (a local archive, a
directory holding one under its official name, or an http(s)/file URL; a URL ending in "/" is a
mirror directory to which the official name is appended), else from the official URL. The archive's
own md5 is checked only when it came from the official URL, since mirrors may re-pack it; every data
member is always checked against the official member md5s below.

CIFAR_MEMBER_MD5S, if set, names a JSON file {member: md5} that replaces the official member table.
It exists only for testing with small non-official archives; a warning is printed when it is used.
"""

import gzip
import hashlib
import io
import json
import os
import pickle
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from resnet_cifar.params import data_params, load_params
from resnet_cifar.paths import raw_path
from resnet_cifar.datasets import DataError
from resnet_cifar.stage import StageError, atomic_path, run

OFFICIAL_URL_BASE = "https://www.cs.toronto.edu/~kriz/"
OFFICIAL_ARCHIVE_MD5S = {
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
    "cifar-10-binary.tar.gz": "c32a1d4ab5d03f1284b67883e8d87530",
    "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
    "cifar-100-binary.tar.gz": "03b5dce01913d631647c71ecec9e9cb8",
}
# From the official site via torchvision's cifar.py (the binary ones checked against the official archive).
OFFICIAL_MEMBER_MD5S = {
    "cifar-10-batches-py/data_batch_1": "c99cafc152244af753f735de768cd75f",
    "cifar-10-batches-py/data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "cifar-10-batches-py/data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "cifar-10-batches-py/data_batch_4": "634d18415352ddfa80567beed471001a",
    "cifar-10-batches-py/data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "cifar-10-batches-py/test_batch": "40351d587109b95175f43aff81a1287e",
    "cifar-10-batches-bin/data_batch_1.bin": "5dd7e06a14cb22eb9f671a540d1b7c25",
    "cifar-10-batches-bin/data_batch_2.bin": "5ea93a67294ea407fff1d09f752e9692",
    "cifar-10-batches-bin/data_batch_3.bin": "942cd6a4bcdd0dd3c604fbe906cb4421",
    "cifar-10-batches-bin/data_batch_4.bin": "ae636b3ba5c66a11e91e8cb52e771fcb",
    "cifar-10-batches-bin/data_batch_5.bin": "53f37980c15c3d472c316c40844f3f0d",
    "cifar-10-batches-bin/test_batch.bin": "803d5f7f4d78ea53de84dbe85f74fb6d",
    "cifar-100-python/train": "16019d7e3df5f24257cddd939b257f8d",
    "cifar-100-python/test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
}
# No md5 of cifar-100-binary's train.bin/test.bin is published, so without an md5 these two are
# checked by size only: 50,000 and 10,000 records of 2 label bytes + 3,072 pixel bytes.
OFFICIAL_SIZES_WITHOUT_MD5 = {
    "cifar-100-binary/train.bin": 50_000 * 3074,
    "cifar-100-binary/test.bin": 10_000 * 3074,
}
PIXELS = 3 * 32 * 32
RETRY_DELAYS_S = (2, 8)  # waits before the 2nd and 3rd download attempts
TIMEOUT_S = 60


@dataclass(frozen=True)
class ArchiveFormat:
    """One official CIFAR archive: its name, its members and how to read them."""

    file_name: str
    folder: str
    train_members: tuple[str, ...]
    test_member: str
    binary: bool
    label_keys: tuple[bytes, ...]  # pickle keys of the fine (then coarse) labels
    names: tuple[tuple[str, bytes], ...]  # (member, pickle key) of fine (then coarse) class names


BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
FORMATS = {  # per dataset, in order of preference
    "cifar10": (
        ArchiveFormat("cifar-10-python.tar.gz", "cifar-10-batches-py", BATCHES, "test_batch",
                      False, (b"labels",), (("batches.meta", b"label_names"),)),
        ArchiveFormat("cifar-10-binary.tar.gz", "cifar-10-batches-bin",
                      tuple(f"{b}.bin" for b in BATCHES), "test_batch.bin",
                      True, (), (("batches.meta.txt", b""),)),
    ),
    "cifar100": (
        ArchiveFormat("cifar-100-python.tar.gz", "cifar-100-python", ("train",), "test",
                      False, (b"fine_labels", b"coarse_labels"),
                      (("meta", b"fine_label_names"), ("meta", b"coarse_label_names"))),
        ArchiveFormat("cifar-100-binary.tar.gz", "cifar-100-binary", ("train.bin",), "test.bin",
                      True, (), (("fine_label_names.txt", b""), ("coarse_label_names.txt", b""))),
    ),
}


@dataclass(frozen=True)
class Source:
    """Where the archive comes from: a local path or a URL."""

    where: str  # for messages
    path: Path | None = None
    url: str | None = None
    official: bool = False


def resolve_source(dataset: str) -> Source:
    """The archive location from CIFAR_SOURCE, or the official URL."""
    preferred = FORMATS[dataset][0].file_name
    value = os.environ.get("CIFAR_SOURCE")
    if not value:
        url = OFFICIAL_URL_BASE + preferred
        return Source(url, url=url, official=True)
    parsed = urllib.parse.urlparse(value)
    if parsed.scheme in ("http", "https"):
        url = value + preferred if value.endswith("/") else value
        return Source(url, url=url)
    path = Path(urllib.request.url2pathname(parsed.path) if parsed.scheme == "file" else value)
    if path.is_dir():
        path = _archive_in(path, dataset)
    if not path.is_file():
        raise DataError(f"CIFAR_SOURCE={value}: no such file or directory "
                        f"(expected a CIFAR archive, a directory holding one, or a URL)")
    return Source(str(path), path=path)


def _archive_in(directory: Path, dataset: str) -> Path:
    """The official archive in `directory`, the python version if both are there."""
    names = [fmt.file_name for fmt in FORMATS[dataset]]
    for name in names:
        if (directory / name).is_file():
            return directory / name
    raise DataError(f"CIFAR_SOURCE={directory}: directory holds none of the official archive names "
                    f"for {dataset} (expected {' or '.join(names)})")


@contextmanager
def local_archive(source: Source) -> Iterator[Path]:
    """The archive as a local file, downloaded into a private temporary directory if needed.

    The directory is removed on exit, Ctrl-C included, and nothing is cached: a later run never
    reads a partial download. The download is complete when its size matches Content-Length and
    its md5s (checked afterwards) match.
    """
    if source.path is not None:
        yield source.path
        return
    with tempfile.TemporaryDirectory(prefix="cifar-download-") as tmp:
        path = Path(tmp) / Path(urllib.parse.urlparse(source.url).path).name
        download(source.url, path)
        yield path


def download(url: str, path: Path) -> None:
    """Download `url` to `path`, retrying transient network errors with backoff."""
    for attempt, delay in enumerate((0, *RETRY_DELAYS_S), start=1):
        time.sleep(delay)
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, path.open("wb") as out:
                _copy_with_progress(response, out, int(response.headers.get("Content-Length") or 0))
            return
        except urllib.error.HTTPError as err:
            if err.code < 500 or attempt > len(RETRY_DELAYS_S):
                raise DataError(f"{url}: HTTP error {err.code} {err.reason} (expected 200 OK)") from None
            print(f"download: HTTP {err.code}, retrying", file=sys.stderr)
        except OSError as err:  # URLError, timeouts, resets, early end of the body
            reason = getattr(err, "reason", err)
            if attempt > len(RETRY_DELAYS_S):
                raise DataError(
                    f"{url}: download failed after {attempt} attempts ({reason}); without network, "
                    f"set CIFAR_SOURCE to a local archive or a directory holding one, "
                    f"e.g. CIFAR_SOURCE=/path/to/cifar-10-python.tar.gz") from None
            print(f"download: {reason}, retrying", file=sys.stderr)


def _copy_with_progress(response: BinaryIO, out: BinaryIO, total: int) -> None:
    """Copy the response body to `out`, reporting percent and MB on stderr every 5% or second."""
    done, shown_at, shown_percent = 0, time.monotonic(), -5
    while chunk := response.read(1 << 20):
        out.write(chunk)
        done += len(chunk)
        percent = 100 * done // total if total else 0
        if percent >= shown_percent + 5 or time.monotonic() - shown_at >= 1 or done == total:
            of_total = f" of {total / 1e6:.1f} MB ({percent}%)" if total else ""
            print(f"download: {done / 1e6:.1f} MB{of_total}", file=sys.stderr, flush=True)
            shown_at, shown_percent = time.monotonic(), percent
    if total and done != total:
        raise OSError(f"connection closed after {done:,} of {total:,} bytes")


def md5_of_file(path: Path) -> str:
    """The md5 of a file, read in blocks (archives are 170 MB)."""
    digest = hashlib.md5()
    with path.open("rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def member_md5s() -> tuple[dict[str, str], str]:
    """The member md5 table, and what it is: the official one, or CIFAR_MEMBER_MD5S's override."""
    override = os.environ.get("CIFAR_MEMBER_MD5S")
    if not override:
        return OFFICIAL_MEMBER_MD5S, "official"
    try:
        table = json.loads(Path(override).read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"CIFAR_MEMBER_MD5S={override}: expected a JSON file of member md5s "
                        f"({err})") from None
    print(f"warning: CIFAR_MEMBER_MD5S={override}: checking members against this table, "
          "NOT the official CIFAR md5s (meant for tests with non-official archives)", file=sys.stderr)
    return table, f"CIFAR_MEMBER_MD5S={override}"


def read_archive(path: Path, dataset: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """The arrays of the npz, and one line per verified member, read straight from the tar.gz."""
    with path.open("rb") as file:
        magic = file.read(2)
    if magic != b"\x1f\x8b":
        raise DataError(f"{path}: not a gzip file (expected a .tar.gz starting with bytes 1f 8b, "
                        f"found {magic.hex(' ') or 'an empty file'})")
    try:
        with tarfile.open(path, "r:gz") as tar:
            return _read_tar(tar, path, dataset)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise DataError(f"{path}: truncated or not a tar.gz archive ({err}); expected a complete "
                        "CIFAR .tar.gz, download it again") from None


def _read_tar(tar: tarfile.TarFile, path: Path, dataset: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """What read_archive returns, from the open archive at `path`."""
    fmt = _detect_format(tar, path, dataset)
    md5s, table = member_md5s()
    checks = []

    def read_member(name: str) -> bytes:
        try:
            return tar.extractfile(f"{fmt.folder}/{name}").read()
        except (KeyError, AttributeError):  # absent, or not a regular file
            raise DataError(f"{path}: member {fmt.folder}/{name} missing (expected the official layout "
                            f"of {fmt.file_name})") from None

    def read_batch(name: str) -> tuple[np.ndarray, np.ndarray]:
        data = read_member(name)
        checks.append(_verify_member(f"{fmt.folder}/{name}", data, md5s, table, path))
        return _parse_batch(data, fmt, f"{path}: member {fmt.folder}/{name}")

    train = [read_batch(name) for name in fmt.train_members]
    x_test, y_test = read_batch(fmt.test_member)
    x_train, y_train = np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])
    arrays = {"x_train": x_train, "y_train": y_train[:, 0], "x_test": x_test, "y_test": y_test[:, 0]}
    for (member, key), prefix in zip(fmt.names, ("", "coarse_")):
        names = _class_names(read_member(member), key, f"{path}: member {fmt.folder}/{member}")
        arrays[f"{prefix}classes"] = np.array(names)
    if len(fmt.names) == 2:
        arrays |= {"y_train_coarse": y_train[:, 1], "y_test_coarse": y_test[:, 1]}
    return arrays, checks


def _detect_format(tar: tarfile.TarFile, path: Path, dataset: str) -> ArchiveFormat:
    """The format of `dataset` whose folder the archive's members are in."""
    folders = {name.split("/")[0] for name in tar.getnames()}
    for fmt in FORMATS[dataset]:
        if fmt.folder in folders:
            return fmt
    expected = " or ".join(f"{fmt.folder}/" for fmt in FORMATS[dataset])
    raise DataError(f"{path}: not a {dataset} archive (expected members under {expected}, "
                    f"found {', '.join(sorted(folders)) or 'no members'})")


def _verify_member(member: str, data: bytes, md5s: dict[str, str], table: str, archive: Path) -> str:
    """Check a data member against its md5 (or official size, where none is published); say which."""
    if member not in md5s and member in OFFICIAL_SIZES_WITHOUT_MD5:
        expected_size = OFFICIAL_SIZES_WITHOUT_MD5[member]
        if len(data) != expected_size:
            raise DataError(f"{archive}: member {member}: expected {expected_size:,} bytes (the official "
                            f"record count), found {len(data):,}")
        return f"{member}: size {len(data):,} bytes ok (no official md5 is published)"
    if member not in md5s:
        raise DataError(f"{archive}: member {member}: no md5 for it in the {table} table")
    actual = hashlib.md5(data).hexdigest()
    if actual != md5s[member]:
        raise DataError(f"{archive}: member {member}: md5 mismatch, expected {md5s[member]} "
                        f"({table} table), got {actual}")
    return f"{member}: md5 {actual} ok ({table})"


def _parse_batch(data: bytes, fmt: ArchiveFormat, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N,32,32,3) uint8 and labels (N, fine[, coarse]) uint8 of one data member."""
    if fmt.binary:
        pixels, labels = _parse_records(data, len(fmt.names), where)
    else:
        pixels, labels = _parse_pickled_batch(data, fmt.label_keys, where)
    # Official records are R, G, B planes of 32 rows of 32 pixels (CHW); Keras wants HWC.
    return pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _parse_records(data: bytes, label_bytes: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (N, 3072) and labels (N, fine[, coarse]) of fixed-size binary records."""
    record_size = label_bytes + PIXELS
    if len(data) % record_size or not data:
        raise DataError(f"{where}: {len(data):,} bytes is not a positive multiple of the "
                        f"{record_size}-byte record ({label_bytes} label bytes + {PIXELS} pixels)")
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, record_size)
    # CIFAR-100 records start coarse, fine; reversed, the columns read fine[, coarse] as elsewhere.
    return records[:, label_bytes:], records[:, label_bytes - 1::-1]


def _parse_pickled_batch(data: bytes, label_keys: tuple[bytes, ...],
                         where: str) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (N, 3072) and labels (N, fine[, coarse]) of a pickled batch."""
    batch = _unpickle(data, where)
    missing = [key for key in (b"data", *label_keys) if key not in batch]
    if missing:
        raise DataError(f"{where}: expected keys {', '.join(map(repr, missing))} in the pickled batch")
    pixels = np.asarray(batch[b"data"])
    if pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != PIXELS:
        raise DataError(f"{where}: expected b'data' of shape (N, {PIXELS}) uint8, "
                        f"found {pixels.shape} {pixels.dtype}")
    labels = np.column_stack([np.asarray(batch[key], dtype=np.int64) for key in label_keys])
    if len(labels) != len(pixels) or labels.min(initial=0) < 0 or labels.max(initial=0) > 255:
        raise DataError(f"{where}: expected {len(pixels)} labels in 0..255, found {len(labels)}")
    return pixels, labels.astype(np.uint8)


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds only dicts, lists, bytes, numbers and numpy arrays."""

    # ndarray's own reduce function; its module (numpy.core/_core) depends on the numpy version.
    _reconstruct = np.ndarray(0).__reduce__()[0]
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"): _reconstruct,
               ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
               ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return self.ALLOWED[(module, name)]


def _unpickle(data: bytes, where: str) -> dict:
    """The dict pickled in a python-version member (keys are bytes, as Python 2 wrote them)."""
    try:
        batch = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as err:  # a corrupt pickle can raise nearly anything
        raise DataError(f"{where}: expected a pickled dict, could not unpickle it ({err})") from None
    if not isinstance(batch, dict):
        raise DataError(f"{where}: expected a pickled dict, found {type(batch).__name__}")
    return batch


def _class_names(data: bytes, key: bytes, where: str) -> list[str]:
    """Class names from a text member (one per line) or, with `key`, a pickled meta member."""
    names = _unpickle(data, where).get(key) if key else data.split(b"\n")
    if not isinstance(names, list):
        raise DataError(f"{where}: expected a list of class names under {key!r}, "
                        f"found {type(names).__name__}")
    return [name.decode(errors="replace").strip() for name in names if name.strip()]


def main(argv: list[str]) -> None:
    """Stage `download`: write data/raw/<data.dataset>.npz and print what was verified."""
    if argv:
        raise StageError(f"expected no arguments, got {' '.join(argv)} (set data.dataset in params.yaml)")
    dataset = data_params(load_params()).dataset
    source = resolve_source(dataset)
    print(f"source: {source.where}")
    with local_archive(source) as archive:
        if source.official:
            expected, actual = OFFICIAL_ARCHIVE_MD5S[archive.name], md5_of_file(archive)
            if actual != expected:
                raise DataError(f"{source.where}: archive md5 mismatch, expected {expected}, got {actual}")
            print(f"archive md5 {actual} ok")
        arrays, checks = read_archive(archive, dataset)
    output = raw_path(dataset)
    with atomic_path(output) as tmp:
        np.savez(tmp, **arrays)
    print("\n".join(checks))
    print(f"{dataset}: " + ", ".join(f"{key} {value.shape}" for key, value in arrays.items()))
    print(f"wrote {output}")


if __name__ == "__main__":
    run(main)
