"""The machine a stage runs on (runtime.py): precision, devices, the CPU's name, TensorFlow's graph optimizer."""

import subprocess
import sys

import pytest
import tensorflow as tf

from resnet_cifar import runtime
from resnet_cifar.stage import StageError


@pytest.mark.parametrize("flags, expected", [("fpu avx512f avx512_bf16 sse", "bfloat16"),
                                             ("fpu amx_bf16 amx_tile", "bfloat16"),
                                             ("fpu avx512f avx2", "float32")])
def test_auto_precision_follows_the_cpu(tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert runtime.resolve_precision("auto", cpuinfo) == expected
    assert runtime.resolve_precision("auto", tmp_path / "missing") == "float32"
    assert runtime.resolve_precision("float32", cpuinfo) == "float32"
    assert runtime.resolve_precision("bfloat16", tmp_path / "missing") == "bfloat16"


@pytest.mark.parametrize("capabilities, expected", [([(9, 0)], "bfloat16"), ([(8, 0), (8, 6)], "bfloat16"),
                                                    ([(8, 0), (7, 5)], "float16"), ([(7, 0)], "float16"),
                                                    ([(6, 1)], "float32")])
def test_auto_precision_follows_the_oldest_gpu_in_use(tmp_path, capabilities, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu avx512_bf16\n")  # the GPUs decide, not the CPU
    assert runtime.resolve_precision("auto", cpuinfo, gpu_capabilities=capabilities) == expected
    assert runtime.resolve_precision("float32", cpuinfo, gpu_capabilities=capabilities) == "float32"


@pytest.mark.parametrize("flags, named", [("fpu avx512f avx512_bf16", "AVX-512 BF16"), ("fpu avx2", "no AVX-512 BF16")])
def test_the_cpu_is_named_with_its_bfloat16_support(tmp_path, flags, named):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: {flags}\n")
    assert runtime.cpu_name(cpuinfo) == f"AMD EPYC 9R14 ({named})"


def test_the_stages_turn_grapplers_remapper_off():
    runtime.quiet_graph_optimizer()
    assert tf.config.optimizer.get_experimental_options()["remapping"] is False


def test_pinned_devices_must_exist():
    # Naming a GPU this machine lacks is an error that says how many there are (on any machine).
    visible = len(tf.config.list_physical_devices("GPU"))
    with pytest.raises(StageError, match=rf"^params.yaml: train.devices: no GPU {visible} on this machine "
                                         rf"\({visible} visible\)$"):
        runtime.use_devices((visible,))


def test_devices_cpu_hides_every_gpu():
    # In a process of its own: hiding devices would change the rest of the suite's.
    shown = subprocess.run([sys.executable, "-c", "from resnet_cifar import runtime; "
                            "devices = runtime.use_devices('cpu'); print(devices.gpus, devices.replicas())"],
                           capture_output=True, text=True, check=True)
    assert shown.stdout.splitlines()[-1] == "() []"


@pytest.mark.parametrize("xla, arch, precision, on_one_cpu, expected", [
    ("auto", "conv", "float32", True, True),  # measured 2x faster (docs/speed.md)
    ("auto", "dense", "float32", True, False), ("auto", "conv", "bfloat16", True, False),
    ("auto", "conv", "float32", False, False),  # on GPUs or CPU replicas: TensorFlow's deterministic ops
    (False, "conv", "float32", True, False), (True, "dense", "bfloat16", False, True)])
def test_auto_xla_compiles_convolutions_on_tensorflows_cpu_in_float32(xla, arch, precision, on_one_cpu, expected):
    assert runtime.resolve_xla(xla, arch, precision, on_one_cpu) is expected


@pytest.mark.parametrize("backend, expected", [("jax", True), ("torch", False)])
def test_auto_xla_is_the_backends_own_way_elsewhere(monkeypatch, backend, expected):
    monkeypatch.setattr(runtime, "BACKEND", backend)
    assert runtime.resolve_xla("auto", "conv", "float32", on_one_cpu=True) is expected


def test_xla_on_the_torch_backend_names_the_key(monkeypatch):
    monkeypatch.setattr(runtime, "BACKEND", "torch")
    with pytest.raises(StageError, match=r"params.yaml: train.xla: true, but the torch backend"):
        runtime.resolve_xla(True, "conv", "float32", on_one_cpu=True)
