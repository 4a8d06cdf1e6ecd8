"""Residual networks on CIFAR-10/100, as a reproducible DVC pipeline."""

import atexit
import importlib.util
import os
import re
import sys
import threading

# TensorFlow's C++ start-up notices (no GPU found, CPU features, oneDNN, a tf.data attribute)
# bury the stage's own output. Some are printed before TF_CPP_MIN_LOG_LEVEL or absl logging can
# be set, so a stage (`python -m resnet_cifar.<stage>`, run while argv[0] is still "-m") sends
# its stderr through a filter that drops them and passes every other line on.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
TENSORFLOW_NOISE = re.compile(
    rb"^(WARNING: All log messages before absl::InitializeLog\(\)"
    rb"|[IWE]\d{4} [\d:. ]+ \d+ (cudart_stub|cuda_platform|cuda_executor|cuda_diagnostics"
    rb"|cpu_feature_guard|port|node_def_util)\.cc:\d+\]"
    rb"|To enable the following instructions:)")


def _filter_stderr(noise: re.Pattern) -> None:
    """Replace file descriptor 2 with a pipe whose lines, but those matching `noise`, reach the
    original stderr; at exit, wait until the last line is through."""
    read_end, write_end = os.pipe()
    original = os.dup(2)
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward() -> None:
        with os.fdopen(read_end, "rb") as lines, os.fdopen(original, "wb", buffering=0) as out:
            for line in lines:
                if not noise.match(line):
                    out.write(line)

    forwarder = threading.Thread(target=forward, daemon=True)
    forwarder.start()

    def drain() -> None:
        sys.stderr.flush()
        os.close(2)  # the pipe's last writer in this process: the forwarder reads to its end
        forwarder.join(timeout=5)

    atexit.register(drain)


def _use_configured_backend() -> None:
    """Keras reads KERAS_BACKEND once, when first imported: set it to params.yaml's train.backend
    before a stage imports Keras, where that backend is installed (where it is not, or params.yaml
    is wrong, the stage stops and says so: runtime.check_backend, params)."""
    from resnet_cifar.params import ParamsError, backend, load_params
    try:
        name = backend(load_params())
    except ParamsError:
        return
    if importlib.util.find_spec(name) is not None:
        os.environ["KERAS_BACKEND"] = name


if sys.argv[:1] == ["-m"]:
    from resnet_cifar.stage import listen_for_stop_requests
    listen_for_stop_requests()  # before the imports of seconds (TensorFlow): a Ctrl-C then still ends cleanly
    _filter_stderr(TENSORFLOW_NOISE)
    _use_configured_backend()
