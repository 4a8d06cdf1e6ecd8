"""The machine a stage runs on, on each Keras backend: devices, precision, distribution, determinism,
and the record of what ran, which the train stage writes beside its times. Everything that differs
between TensorFlow, JAX and PyTorch is here.

The backend is params.yaml's `train.backend`. Keras reads KERAS_BACKEND once, when first imported,
so every stage sets it from params.yaml before anything imports Keras (resnet_cifar/__init__.py).

Precision `auto` trains in mixed bfloat16 where the hardware computes bfloat16 natively (a GPU
from Ampere on; a CPU with AVX-512 BF16 or AMX: 1.6x faster than float32 on the baseline, 1.85x
the assignment's code path, bench/bench_train.py), in mixed float16 with loss scaling on Volta and
Turing GPUs, in float32 otherwise.

`devices` `auto` trains on every visible GPU, synchronous data parallel (the batch size stays the
global batch), or on the CPU when there is none; a list pins the GPUs. TensorFlow distributes with
MirroredStrategy, JAX with Keras's DataParallel; the PyTorch backend trains on one device.

On JAX one model also trains across processes and hosts, as one synchronous data-parallel job:
the KERAS_DISTRIBUTION_* environment variables describe the job (README: Backends and GPUs).
"""

import contextlib
import importlib
import importlib.util
import os
import platform
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from resnet_cifar.params import BACKENDS
from resnet_cifar.stage import StageError

CPUINFO = Path("/proc/cpuinfo")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# float16: Keras adds loss scaling
POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
# Keras's description of a job of several processes (read by keras.distribution.initialize)
CALL_SECONDS = 1.0  # the training steps of one call into the backend (steps_per_call)
JOB_ENV = ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES", "KERAS_DISTRIBUTION_PROCESS_ID")
BACKEND = keras.backend.backend()
if BACKEND == "tensorflow":
    import tensorflow as tf
elif BACKEND == "jax":
    import jax
elif BACKEND == "torch":
    import torch


def check_backend(wanted: str) -> None:
    """Stop unless Keras runs on `wanted`, the backend params.yaml names."""
    if BACKEND == wanted:
        return
    if importlib.util.find_spec(wanted) is None:
        raise StageError(f"params.yaml: train.backend: {wanted} is not installed here; install it "
                         f"(`pip install {BACKENDS[wanted]}`; README: Backends and GPUs) or choose another one")
    raise StageError(f"params.yaml: train.backend: {wanted}, but Keras started on {BACKEND} (KERAS_BACKEND): "
                     f"run the stage as `python -m resnet_cifar.<stage>` from the project root, which sets it")


def join_processes() -> tuple[int, int]:
    """(this process's index, the number of processes) of the training job: join the others where
    KERAS_DISTRIBUTION_NUM_PROCESSES says there are several. Call it before anything touches a device."""
    count = os.environ.get(JOB_ENV[1], "1")
    if not count.isdigit() or int(count) < 1:
        raise StageError(f"{JOB_ENV[1]}={count}: expected the number of processes of the training job")
    if int(count) == 1:
        return 0, 1
    if BACKEND != "jax":
        raise StageError(f"{JOB_ENV[1]}={count}: a job of several processes trains on params.yaml's "
                         f"train.backend: jax, not {BACKEND}")
    missing = [name for name in (JOB_ENV[0], JOB_ENV[2]) if name not in os.environ]
    if missing:
        raise StageError(f"{JOB_ENV[1]}={count}, but {' and '.join(missing)} not set (README: Backends and GPUs)")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPUs exchange gradients over TCP
    keras.distribution.initialize()
    return jax.process_index(), jax.process_count()


def process_count() -> int:
    return jax.process_count() if BACKEND == "jax" else 1


def read_cpuinfo(cpuinfo: Path = CPUINFO) -> str | None:
    """The system's description of the CPU, or None where it has none (not Linux)."""
    try:
        return cpuinfo.read_text()
    except OSError:
        return None


def has_native_bfloat16(description: str) -> bool:
    return bool(set(description.split()).intersection(CPU_BF16_FLAGS))


def resolve_precision(precision: str, cpuinfo: Path = CPUINFO,
                      gpu_capabilities: list[tuple[int, int]] | None = None) -> str:
    """float32, bfloat16 or float16: `auto` is bfloat16 where every GPU in use (compute capability
    8.0 on) or, without GPUs, the CPU has native bfloat16 arithmetic; float16 on GPUs of
    capability 7.x (tensor cores without bfloat16)."""
    if precision != "auto":
        return precision
    if gpu_capabilities:
        oldest = min(gpu_capabilities)
        return "bfloat16" if oldest >= (8, 0) else "float16" if oldest >= (7, 0) else "float32"
    description = read_cpuinfo(cpuinfo)
    return "bfloat16" if description and has_native_bfloat16(description) else "float32"  # unknown: the safe choice


def resolve_xla(xla: bool | str, arch: str, precision: str, on_one_cpu: bool) -> bool:
    """Whether Keras compiles the training steps with XLA (`jit_compile`): `auto` is always on JAX
    (Keras's way there), never on PyTorch (whose compiler is another) and, on TensorFlow, for
    convolutions on one CPU device in float32, where oneDNN's own float32 convolutions are the
    slower path (docs/speed.md; TensorFlow's replicas of a CPU split into devices fail under XLA);
    elsewhere TensorFlow runs its ops one by one, deterministic (seed_everything)."""
    if xla is True and BACKEND == "torch":
        raise StageError("params.yaml: train.xla: true, but the torch backend does not compile with XLA; "
                         "choose auto or false")
    if xla != "auto":
        return xla
    if BACKEND == "tensorflow":
        return arch == "conv" and precision == "float32" and on_one_cpu
    return BACKEND == "jax"


def gpus() -> list:
    """The backend's handles of the GPUs it sees."""
    if BACKEND == "tensorflow":
        return tf.config.list_physical_devices("GPU")
    if BACKEND == "jax":
        return [device for device in jax.devices() if device.platform == "gpu"]
    return list(range(torch.cuda.device_count()))


def capability(gpu) -> tuple[int, int]:
    """A GPU's CUDA compute capability."""
    if BACKEND == "tensorflow":
        return tuple(tf.config.experimental.get_device_details(gpu).get("compute_capability", (0, 0)))
    if BACKEND == "jax":
        return tuple(int(part) for part in getattr(gpu, "compute_capability", "0.0").split("."))
    return tuple(torch.cuda.get_device_capability(gpu))


def gpu_name(gpu) -> str:
    if BACKEND == "tensorflow":
        return tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name)
    if BACKEND == "jax":
        return gpu.device_kind
    return torch.cuda.get_device_name(gpu)


@dataclass(frozen=True)
class Devices:
    """The GPUs a stage trains on (the backend's handles; none: the CPU)."""
    gpus: tuple

    def capabilities(self) -> list[tuple[int, int]]:
        return [capability(gpu) for gpu in self.gpus]

    def replicas(self) -> list[str]:
        """The devices as the backend's distribution names them: the GPUs, or none (the CPU); in a
        job of several processes, those of every process."""
        if process_count() > 1:
            return [f"{device.platform}:{device.id}" for device in jax.devices("gpu" if self.gpus else "cpu")]
        if BACKEND == "tensorflow":
            return [device.name for device in tf.config.list_logical_devices("GPU")]
        return [f"gpu:{gpu.id}" if BACKEND == "jax" else f"cuda:{gpu}" for gpu in self.gpus]

    def name(self) -> str:
        """The GPUs by name, or the CPU, and how many processes had them."""
        name = ", ".join(gpu_name(gpu) for gpu in self.gpus) if self.gpus else cpu_name()
        return name if process_count() == 1 else f"{process_count()} processes, each on {name}"


def use_devices(devices: str | tuple[int, ...]) -> Devices:
    """The GPUs that `devices` names (all of them for `auto`, none for `cpu`); on TensorFlow, the
    only ones its runtime sees from now on. Call it before anything runs on a device."""
    visible = gpus()
    if devices not in ("auto", "cpu") and process_count() > 1:
        raise StageError("params.yaml: train.devices: a job of several processes trains on every GPU of each "
                         "process (auto) or on their CPUs (cpu), not on a list")
    if devices not in ("auto", "cpu"):
        missing = [index for index in devices if index >= len(visible)]
        if missing:
            raise StageError(f"params.yaml: train.devices: no GPU {missing[0]} on this machine "
                             f"({len(visible)} visible)")
    chosen = () if devices == "cpu" else tuple(visible) if devices == "auto" else tuple(visible[i] for i in devices)
    if BACKEND == "tensorflow":  # TensorFlow keeps the others off its runtime
        tf.config.set_visible_devices(list(chosen), "GPU")
    return Devices(chosen)


@contextlib.contextmanager
def precision_policy(precision: str) -> Iterator[None]:
    """Keras's dtype policy for `precision` (float32, bfloat16 or float16, resolved) for the layers
    made in the block, and the one before it afterwards: Keras keeps it as global state."""
    before = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_global_policy(POLICIES[precision])
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(before)


def distribution(devices: list[str]) -> contextlib.AbstractContextManager:
    """The scope to build and train the model in: synchronous data parallel over several devices
    (TensorFlow's MirroredStrategy, Keras's DataParallel on JAX), or the backend's default."""
    if len(devices) <= 1:
        return tf.distribute.get_strategy().scope() if BACKEND == "tensorflow" else contextlib.nullcontext()
    if BACKEND == "tensorflow":
        return tf.distribute.MirroredStrategy(devices).scope()
    if BACKEND == "jax":  # each process reads its own share of every batch (batches.py): no sharding
        return keras.distribution.DataParallel(devices=devices, auto_shard_dataset=False).scope()
    raise StageError(f"params.yaml: train.devices: the torch backend trains on one device, not {len(devices)} "
                     "(choose one GPU, or the jax or tensorflow backend)")


def check_even_split(variant: str, batch_size: int, images: int, devices: int) -> None:
    """Stop unless every batch of an epoch, its last and smaller one too, splits evenly over the
    devices, as JAX's data parallel needs (TensorFlow's splits uneven batches itself)."""
    last = images % batch_size or batch_size
    if BACKEND == "jax" and (batch_size % devices or last % devices):
        raise StageError(f"params.yaml: the batch_size of variant {variant}, {batch_size}, leaves batches of "
                         f"{batch_size} and {last} of its {images} training images, which do not split over "
                         f"{devices} devices; choose one that does")


def steps_per_call(steps_per_epoch: int, step_seconds: Callable[[], float], replicas: int) -> int:
    """Steps per call of the training function: at most CALL_SECONDS' worth by `step_seconds()`,
    which keeps Python's per-call overhead small and brings a boundary (a stop request, the
    progress line: progress.py) that often. One on several devices (Keras 3 fails otherwise under
    TensorFlow's replicas: keras-team/keras#19246; on JAX a prediction before `fit` would drop the
    sharded state), in a job of several processes (whose calls must match) and on PyTorch (whose
    steps run from Python one by one: Keras allows no more there)."""
    if BACKEND == "torch" or process_count() > 1 or replicas > 1:
        return 1
    most = max(1, min(steps_per_epoch, int(CALL_SECONDS / step_seconds())))
    # A divisor of the epoch's steps: Keras's last call of an epoch would otherwise run on into
    # the next epoch's batches.
    return max(steps for steps in range(1, most + 1) if steps_per_epoch % steps == 0)


def synchronized_norm(replicas: int) -> bool:
    """Whether batch norm must average its statistics over the replicas itself (TensorFlow's
    MirroredStrategy; Keras's DataParallel on JAX normalizes over the global batch already)."""
    return BACKEND == "tensorflow" and replicas > 1


def seed_everything(seed: int, xla: bool) -> None:
    """Seed Python, NumPy and the backend, and make its ops deterministic, for repeatable runs.
    Not TensorFlow's ops where the training step is compiled with XLA (`xla`, resolved): Keras turns
    XLA off under TensorFlow's op determinism, and XLA's CPU code is deterministic by itself (a
    killed and resumed run ends bit-identical: tests/test_pipeline.py)."""
    keras.utils.set_random_seed(seed)
    if BACKEND == "tensorflow" and not xla:
        tf.config.experimental.enable_op_determinism()
    elif BACKEND == "torch":
        torch.use_deterministic_algorithms(True)


def global_random_state() -> np.ndarray:
    """The backend's global generator, which PyTorch's dropout draws from (Keras's seed generators
    hold the other backends' random state, and PyTorch's where a layer was given a seed); empty
    elsewhere. A checkpoint keeps it, for resumes that end as an uninterrupted run."""
    return torch.get_rng_state().numpy() if BACKEND == "torch" else np.zeros(0, np.uint8)


def restore_global_random_state(state: np.ndarray) -> None:
    """Put back what `global_random_state` returned."""
    if BACKEND == "torch":
        torch.set_rng_state(torch.from_numpy(state))


def quiet_graph_optimizer() -> None:
    """TensorFlow: turn off grappler's remapper. On oneDNN CPUs it fuses a residual block's Add
    and ReLU into one node that the TFG optimizer then rejects ("E0000 ... tfg_optimizer_hook ...
    has an empty op name"), an error line per traced function that changes nothing but alarms;
    without the fusion the baseline trains as fast (docs/speed.md)."""
    if BACKEND == "tensorflow":
        tf.config.optimizer.set_experimental_options({"remapping": False})


def cpu_name(cpuinfo: Path = CPUINFO) -> str:
    """The CPU's model, and whether it computes bfloat16 natively (where the system tells)."""
    description = read_cpuinfo(cpuinfo)
    if description is None:
        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in description.splitlines()
                  if line.startswith("model name")), platform.machine())
    return f"{model} ({'AVX-512 BF16' if has_native_bfloat16(description) else 'no AVX-512 BF16'})"


def versions() -> dict[str, str]:
    return {"keras": keras.__version__, BACKEND: importlib.import_module(BACKEND).__version__}


def run_record(precision: str, devices: Devices) -> dict[str, str]:
    """What produced a result: backend, resolved precision, device and versions."""
    return {"backend": BACKEND, "precision": precision, "device": devices.name(), **versions()}
