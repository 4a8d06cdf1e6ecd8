"""Checkpoints and saved models (checkpoint.py)."""

import subprocess
import sys

import keras
import numpy as np

from resnet_cifar import checkpoint


# Named layers: Keras numbers unnamed ones by how many it has made in the process.
SEEDED_MODEL = ("keras.utils.set_random_seed(0); model = keras.Sequential("
                "[keras.Input((4,), name='image'), keras.layers.Dense(3, name='logits')], name='tiny')")


def test_a_saved_model_is_the_same_bytes_for_the_same_weights(tmp_path):
    """The same model built and saved by another process, later: other Python object ids, another
    date and time."""
    first, again = tmp_path / "first.keras", tmp_path / "again.keras"
    namespace = {"keras": keras}
    exec(SEEDED_MODEL, namespace)
    checkpoint.save_model(namespace["model"], first)
    subprocess.run([sys.executable, "-c", f"import sys, keras; from pathlib import Path; {SEEDED_MODEL}; "
                    "from resnet_cifar.checkpoint import save_model; save_model(model, Path(sys.argv[1]))",
                    str(again)], check=True, capture_output=True)
    assert first.read_bytes() == again.read_bytes()
    for saved, original in zip(keras.models.load_model(again).get_weights(), namespace["model"].get_weights()):
        np.testing.assert_array_equal(saved, original)
