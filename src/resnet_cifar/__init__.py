"""Dense residual networks on CIFAR-10/100, as a reproducible DVC pipeline."""
