"""Dense residual networks on CIFAR-10/100, as a reproducible DVC pipeline."""

import os

# TensorFlow's C++ start-up notices (no GPU found, CPU features) bury the stage's own output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
