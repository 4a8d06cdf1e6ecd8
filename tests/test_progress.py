"""The boundaries between calls into the backend: the progress of the running pass, and stop
requests acted on there (progress.py, runtime.steps_per_call, train.pace)."""

import dataclasses
import io
import re

import keras
import numpy as np
import pytest

from support import setup_project
from resnet_cifar import batches, datasets, prepare, progress, runtime, stage, train
from resnet_cifar.params import load_params, variant_spec


def tiny_model() -> keras.Model:
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(inputs))
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    return model


def test_progress_shows_the_step_images_per_second_and_the_time_left(monkeypatch):
    monkeypatch.setattr(progress, "LOG_EVERY_SECONDS", 0)  # a line at every boundary
    x, y = np.zeros((64, 4), np.float32), keras.utils.to_categorical(np.zeros(64), 2)
    shown = io.StringIO()
    model = tiny_model()
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[progress.Boundaries("v", 16, shown)])
    model.predict(x, batch_size=32, verbose=0, callbacks=[progress.Boundaries("v", 32, shown)])
    lines = shown.getvalue().splitlines()
    assert [re.sub(r"\d+ images/s  ~\d+ s left", "RATE", line) for line in lines] == (
        [f"[v] epoch {epoch}/2  step {step}/4  RATE" for epoch in (1, 2) for step in range(1, 5)]
        + [f"[v] predicting  step {step}/2  RATE" for step in (1, 2)])


def test_a_stop_request_takes_effect_at_the_next_boundary():
    x, y = np.zeros((64, 4), np.float32), keras.utils.to_categorical(np.zeros(64), 2)
    calls = []
    counted = keras.callbacks.LambdaCallback(on_train_batch_begin=lambda batch, logs: calls.append(batch))
    stage._STOP.requested.set()
    try:
        with pytest.raises(KeyboardInterrupt):
            tiny_model().fit(x, y, batch_size=16, epochs=3, verbose=0,
                             callbacks=[counted, progress.Boundaries("v", 16, io.StringIO())])
    finally:
        stage._STOP.requested.clear()
    assert calls == [0]


def test_a_call_into_the_backend_lasts_about_a_second_at_most_and_divides_the_epoch():
    assert runtime.CALL_SECONDS == 1.0
    assert runtime.steps_per_call(196, lambda: 0.022, replicas=1) == 28  # 45 steps take a second; 28 divides 196
    assert runtime.steps_per_call(196, lambda: 0.0001, replicas=1) == 196
    assert runtime.steps_per_call(49, lambda: 17.0, replicas=1) == 1
    assert runtime.steps_per_call(157, lambda: 0.01, replicas=1) == 1  # a prime number of steps, over 100
    assert runtime.steps_per_call(196, lambda: 0.022, replicas=2) == 1  # several devices: a step per call


def test_the_pace_changes_no_number(tmp_path, monkeypatch):
    """Training at one step per call and at several ends with the same weights, bit for bit."""
    setup_project(tmp_path, monkeypatch, "cifar-10-binary", n_train=64)
    prepare.main([])
    data = datasets.load_prepared()
    spec = dataclasses.replace(variant_spec(load_params(), "deep"), epochs=3,  # with dropout: its RNG too
                               precision="float32")
    weights = []
    for paces in ([1, 1, 1], [1, 4, 2]):
        keras.utils.set_random_seed(spec.seed)
        model = train.compiled_model(spec, data["x_train"], 10, steps_per_epoch=4)
        for epoch, steps in enumerate(paces):
            train.pace(model, steps)
            model.fit(batches.TrainingBatches(data["x_train"], data["y_train"], spec, epoch), steps_per_epoch=4,
                      epochs=epoch + 1, initial_epoch=epoch, shuffle=False, verbose=0)
        weights.append(model.get_weights())
    for paced, one_by_one in zip(*weights):
        np.testing.assert_array_equal(paced, one_by_one)
