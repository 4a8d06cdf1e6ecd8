"""Small CIFAR archives in the four official layouts and record encodings, for tests.

    archive = make_archive(tmp_path, "cifar-10-binary")
    monkeypatch.setenv("CIFAR_SOURCE", str(archive.path))
    monkeypatch.setenv("CIFAR_MEMBER_MD5S", str(archive.md5s_path))  # accept its non-official md5s
"""

import dataclasses
import hashlib
import io
import json
import pickle
import tarfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

FORMATS = ("cifar-10-python", "cifar-10-binary", "cifar-100-python", "cifar-100-binary")
FOLDERS = {
    "cifar-10-python": "cifar-10-batches-py",
    "cifar-10-binary": "cifar-10-batches-bin",
    "cifar-100-python": "cifar-100-python",
    "cifar-100-binary": "cifar-100-binary",
}
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FINE_CLASSES = [f"fine_{i:02d}" for i in range(100)]
COARSE_CLASSES = [f"coarse_{i:02d}" for i in range(20)]


@dataclasses.dataclass(frozen=True)
class Archive:
    """A generated archive and what the download stage must read from it."""

    path: Path
    md5s: dict[str, str]  # md5 of every data member, keyed by its path in the archive
    md5s_path: Path  # the same table as JSON, for CIFAR_MEMBER_MD5S
    x_train: np.ndarray  # (n_train, 32, 32, 3) uint8, HWC
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
    y_train_coarse: np.ndarray | None = None  # CIFAR-100 only
    y_test_coarse: np.ndarray | None = None
    coarse_classes: list[str] | None = None


def make_archive(directory: Path, fmt: str, n_train: int = 50, n_test: int = 10, seed: int = 0,
                 replace: Mapping[str, bytes | None] = {}) -> Archive:
    """Write `<directory>/<fmt>.tar.gz` (the official file name) with random images and labels.

    CIFAR-10 training images are split over 5 batches in order. `replace` maps member paths to the
    bytes to store instead of the generated ones (None leaves the member out), to make broken archives;
    the md5 table describes what was actually stored.
    """
    rng = np.random.default_rng(seed)
    cifar100 = fmt.startswith("cifar-100")
    n_classes = 100 if cifar100 else 10
    x_train, x_test = (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for n in (n_train, n_test))
    y_train, y_test = (rng.integers(0, n_classes, n, dtype=np.uint8) for n in (n_train, n_test))
    coarse = (rng.integers(0, 20, n_train, dtype=np.uint8), rng.integers(0, 20, n_test, dtype=np.uint8))
    if cifar100:
        archive = Archive(Path(), {}, Path(), x_train, y_train, x_test, y_test, FINE_CLASSES,
                          coarse[0], coarse[1], COARSE_CLASSES)
    else:
        archive = Archive(Path(), {}, Path(), x_train, y_train, x_test, y_test, CIFAR10_CLASSES)

    folder = FOLDERS[fmt]
    members = {f"{folder}/{name}": data for name, data in _members(fmt, archive).items()}
    members |= replace
    path = Path(directory) / f"{fmt}.tar.gz"
    _write_tar_gz(path, {name: data for name, data in members.items() if data is not None})
    md5s = {name: hashlib.md5(data).hexdigest() for name, data in members.items()
            if data is not None and _is_data_member(name)}
    md5s_path = path.with_name(f"{fmt}.md5s.json")
    md5s_path.write_text(json.dumps(md5s, indent=1))
    return dataclasses.replace(archive, path=path, md5s=md5s, md5s_path=md5s_path)


def chw_rows(x: np.ndarray) -> np.ndarray:
    """Images (N,32,32,3) as official rows: R plane, G plane, B plane, each row-major (N, 3072)."""
    return x.transpose(0, 3, 1, 2).reshape(len(x), -1)


def _members(fmt: str, a: Archive) -> dict[str, bytes]:
    """The members of `fmt` (names relative to its folder) holding the arrays of `a`."""
    if fmt == "cifar-10-python":
        batches = _split_in_five(a.x_train, a.y_train)
        members = {f"data_batch_{i + 1}": _pickle_batch(x, {b"labels": y})
                   for i, (x, y) in enumerate(batches)}
        members["test_batch"] = _pickle_batch(a.x_test, {b"labels": a.y_test})
        members["batches.meta"] = pickle.dumps({b"label_names": _encode(a.classes), b"num_vis": 3072})
    elif fmt == "cifar-10-binary":
        batches = _split_in_five(a.x_train, a.y_train)
        members = {f"data_batch_{i + 1}.bin": _records(x, y) for i, (x, y) in enumerate(batches)}
        members["test_batch.bin"] = _records(a.x_test, a.y_test)
        members["batches.meta.txt"] = "".join(f"{name}\n" for name in a.classes).encode() + b"\n"
    elif fmt == "cifar-100-python":
        members = {
            "train": _pickle_batch(a.x_train,
                                   {b"fine_labels": a.y_train, b"coarse_labels": a.y_train_coarse}),
            "test": _pickle_batch(a.x_test, {b"fine_labels": a.y_test, b"coarse_labels": a.y_test_coarse}),
            "meta": pickle.dumps({b"fine_label_names": _encode(a.classes),
                                  b"coarse_label_names": _encode(a.coarse_classes)}),
        }
    else:
        members = {
            "train.bin": _records(a.x_train, a.y_train_coarse, a.y_train),
            "test.bin": _records(a.x_test, a.y_test_coarse, a.y_test),
            "fine_label_names.txt": "\n".join(a.classes).encode() + b"\n",
            "coarse_label_names.txt": "\n".join(a.coarse_classes).encode() + b"\n",
        }
    return members


def _split_in_five(x: np.ndarray, y: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    return list(zip(np.array_split(x, 5), np.array_split(y, 5)))


def _pickle_batch(x: np.ndarray, labels: dict[bytes, np.ndarray]) -> bytes:
    """A python-version data member: a dict with bytes keys, pixels as an array, labels as lists."""
    batch = {b"batch_label": b"generated", b"data": chw_rows(x),
             b"filenames": [b"img_%d.png" % i for i in range(len(x))]}
    return pickle.dumps(batch | {key: [int(v) for v in y] for key, y in labels.items()})


def _records(x: np.ndarray, *labels: np.ndarray) -> bytes:
    """A binary-version data member: per image, its label bytes, then its 3072 pixel bytes."""
    return np.column_stack([*labels, chw_rows(x)]).astype(np.uint8).tobytes()


def _encode(names: list[str]) -> list[bytes]:
    return [name.encode() for name in names]


def _is_data_member(name: str) -> bool:
    return "meta" not in name and not name.endswith("_names.txt")


def _write_tar_gz(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

