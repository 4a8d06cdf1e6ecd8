"""The train stage's checkpoint, and model files that are the same bytes for the same weights.

After every epoch the model, the optimizer, the dropout RNG states (and PyTorch's global one) and
the history are saved to .dvc/tmp/checkpoints/<variant>/. A killed run resumes from there only if
it was made from the same params, data, code and library versions; otherwise it starts over and
says what changed.
"""

import dataclasses
import hashlib
import json
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import keras
import numpy as np

from resnet_cifar.params import VariantSpec
from resnet_cifar.runtime import global_random_state, restore_global_random_state, versions
from resnet_cifar.stage import atomic_path

ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest a zip file can hold


def portable_config(config):
    """The model's config with each `shared_object_id` (a Python object id, new in every process)
    replaced by the order in which it first appears (objects that were shared stay shared), and
    batch norm's `synchronized` off: a switch of training under TensorFlow's MirroredStrategy that
    the other backends refuse to load."""
    numbers: dict[int, int] = {}

    def rewrite(key, value):
        if key == "shared_object_id":
            return numbers.setdefault(value, len(numbers) + 1)
        return False if key == "synchronized" else walk(value)

    def walk(node):
        if isinstance(node, dict):
            return {key: rewrite(key, value) for key, value in node.items()}
        if isinstance(node, list):
            return [walk(item) for item in node]
        return node
    return walk(config)


def save_model(model: keras.Model, path: Path) -> None:
    """Save a .keras file that loads on every backend and whose bytes depend on the model alone:
    Keras writes the save date into metadata.json, Python object ids into config.json and the
    current time into each zip member's header, which are fixed here (portable_config)."""
    with tempfile.TemporaryDirectory() as scratch:
        saved_path = Path(scratch) / path.name
        model.save(saved_path)
        with zipfile.ZipFile(saved_path) as saved, atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w") as out:
            for name in sorted(saved.namelist()):
                content = saved.read(name)
                if name == "metadata.json":
                    content = json.dumps(json.loads(content) | {"date_saved": None}).encode()
                elif name == "config.json":
                    content = json.dumps(portable_config(json.loads(content))).encode()
                out.writestr(zipfile.ZipInfo(name, ZIP_DATE), content, compress_type=zipfile.ZIP_DEFLATED)


def code_hashes() -> dict[str, str]:
    """The md5 of the source of each module of this package that is loaded: those the stage imports,
    which dvc.yaml lists as its deps."""
    package = Path(__file__).parent
    return {f"{package.name}/{Path(module.__file__).name}": hashlib.md5(Path(module.__file__).read_bytes()).hexdigest()
            for name, module in sorted(sys.modules.items())
            if name.startswith(package.name) and getattr(module, "__file__", None)}


def fingerprint(spec: VariantSpec, arrays: list[np.ndarray]) -> dict:
    """What a checkpoint was made from: the variant's params, the training data, the code and the
    library versions."""
    data = hashlib.blake2b()
    for array in arrays:
        data.update(str(array.shape).encode())
        data.update(np.ascontiguousarray(array).data)
    params = hashlib.blake2b(json.dumps(dataclasses.asdict(spec), sort_keys=True).encode())
    return {"params": params.hexdigest(), "data": data.hexdigest(), "code": code_hashes(), "versions": versions()}


def differences(made_from: dict, expected: dict) -> list[str]:
    """What differs between two fingerprints, in words: 'params', 'data', the changed source files,
    the changed library versions."""
    changed = []
    for part in ("params", "data", "code", "versions"):
        old, new = made_from.get(part), expected[part]
        if isinstance(new, dict) and isinstance(old, dict):
            changed += [f"{name} {old.get(name)} -> {new.get(name)}" if part == "versions" else name
                        for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]
        elif old != new:
            changed.append(part)
    return changed


def seed_states(model: keras.Model) -> list:
    """The dropout layers' RNG states, which Keras does not save with the model."""
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]


@dataclasses.dataclass
class TrainingState:
    """Where training stands: what a checkpoint holds besides the model."""

    fingerprint: dict
    history: list[dict] = dataclasses.field(default_factory=list)  # Keras's logs, one per epoch
    epoch_seconds: list[float] = dataclasses.field(default_factory=list)


class Checkpoint(keras.callbacks.Callback):
    """After each epoch, save the model, optimizer, dropout RNG and history, atomically."""

    def __init__(self, directory: Path, state: TrainingState):
        super().__init__()
        self.directory, self.state = directory, state

    def on_train_begin(self, logs=None):
        saved = self.directory / "global_random_state.npy"
        self.resumed_random_state = np.load(saved) if self.state.history and saved.is_file() else None

    def on_train_batch_begin(self, batch, logs=None):
        # At the first batch, not when the checkpoint is loaded: PyTorch's data loader draws from the
        # global generator as `fit` starts its batches, which an uninterrupted run did before its first epoch.
        if self.resumed_random_state is not None:
            restore_global_random_state(self.resumed_random_state)
            self.resumed_random_state = None

    def on_epoch_end(self, epoch, logs=None):
        self.state.history.append({name: float(value) for name, value in (logs or {}).items()})
        with atomic_path(self.directory) as tmp:
            tmp.mkdir()
            self.model.save(tmp / "model.keras")
            np.save(tmp / "seed_states.npy", np.array([v.numpy() for v in seed_states(self.model)]))
            np.save(tmp / "global_random_state.npy", global_random_state())
            (tmp / "state.json").write_text(json.dumps(dataclasses.asdict(self.state)))


def load_checkpoint(directory: Path, expected_fingerprint: dict) -> tuple[keras.Model, TrainingState] | None:
    """The model and state saved by an interrupted run of the same params, data, code and versions."""
    if not (directory / "state.json").is_file():
        return None
    try:
        state = TrainingState(**json.loads((directory / "state.json").read_text()))
        changed = differences(state.fingerprint, expected_fingerprint)
        if changed:
            print(f"{directory}: made with a different {', '.join(changed)}; starting over")
            shutil.rmtree(directory)
            return None
        model = keras.models.load_model(directory / "model.keras")
        for variable, value in zip(seed_states(model), np.load(directory / "seed_states.npy")):
            variable.assign(value)
    except (OSError, ValueError, TypeError, AttributeError) as err:
        print(f"{directory}: unreadable checkpoint ({err}); starting over")
        shutil.rmtree(directory)
        return None
    return model, state
