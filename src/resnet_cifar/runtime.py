"""The machine a stage runs on, as TensorFlow sees it: devices, precision, determinism, the graph
optimizer, and the record of what ran, which the train stage writes beside its times.

Precision `auto` trains in mixed bfloat16 where the hardware computes bfloat16 natively (a GPU
from Ampere on; a CPU with AVX-512 BF16 or AMX: 1.6x faster than float32 on the baseline, 1.85x
the assignment's code path, bench/bench_train.py), in mixed float16 with loss scaling on Volta and
Turing GPUs, in float32 otherwise.

`devices` `auto` trains on every visible GPU, synchronous data parallel (MirroredStrategy; the
batch size stays the global batch), or on the CPU when there is none; a list pins the GPUs.
"""

import platform
from pathlib import Path

import keras
import tensorflow as tf

from resnet_cifar.stage import StageError

CPUINFO = Path("/proc/cpuinfo")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}  # float16: Keras adds loss scaling


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


def use_devices(devices: str | tuple[int, ...]) -> list[tuple[int, int]]:
    """Hide the GPUs that `devices` leaves out (before TensorFlow starts its runtime); return the
    compute capabilities of those in use."""
    gpus = tf.config.list_physical_devices("GPU")
    if devices != "auto":
        missing = [index for index in devices if index >= len(gpus)] if devices != "cpu" else []
        if missing:
            raise StageError(f"params.yaml: train.devices: no GPU {missing[0]} on this machine "
                             f"({len(gpus)} visible)")
        gpus = [] if devices == "cpu" else [gpus[index] for index in devices]
        tf.config.set_visible_devices(gpus, "GPU")
    return [tf.config.experimental.get_device_details(gpu).get("compute_capability", (0, 0)) for gpu in gpus]


def replicas() -> list[str]:
    """The devices to train on: the visible GPUs, or none (the CPU)."""
    return [device.name for device in tf.config.list_logical_devices("GPU")]


def distribution(devices: list[str]) -> tf.distribute.Strategy:
    """MirroredStrategy over several devices; on one, TensorFlow's default (with which Keras
    compiles the training step with XLA on a GPU; it does not under a strategy)."""
    return tf.distribute.MirroredStrategy(devices) if len(devices) > 1 else tf.distribute.get_strategy()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow, and make TF ops deterministic, for repeatable runs."""
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def quiet_graph_optimizer() -> None:
    """Turn off grappler's remapper. On oneDNN CPUs it fuses a residual block's Add and ReLU into
    one node that the TFG optimizer then rejects ("E0000 ... tfg_optimizer_hook ... has an empty op
    name"), an error line per traced function that changes nothing but alarms; without the fusion
    the baseline trains as fast (docs/speed.md)."""
    tf.config.optimizer.set_experimental_options({"remapping": False})


def cpu_name(cpuinfo: Path = CPUINFO) -> str:
    """The CPU's model, and whether it computes bfloat16 natively (where the system tells)."""
    description = read_cpuinfo(cpuinfo)
    if description is None:
        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in description.splitlines()
                  if line.startswith("model name")), platform.machine())
    return f"{model} ({'AVX-512 BF16' if has_native_bfloat16(description) else 'no AVX-512 BF16'})"


def device_name() -> str:
    """The GPUs in use by name, or the CPU."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return cpu_name()
    return ", ".join(tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name) for gpu in gpus)


def versions() -> dict[str, str]:
    return {"keras": keras.__version__, "tensorflow": tf.__version__}


def run_record(precision: str) -> dict[str, str]:
    """What produced a result: backend, resolved precision, device and versions."""
    return {"backend": keras.backend.backend(), "precision": precision, "device": device_name(), **versions()}
