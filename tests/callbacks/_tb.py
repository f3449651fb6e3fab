"""Test helpers: tiny Keras models and reading summaries back from event files."""

from __future__ import annotations

import glob
import os

import keras
import numpy as np
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

LAYOUT_TAG = "custom_scalars__config__"


def dataset(
    n: int = 256, features: int = 16, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Returns `(x, y)` synthetic regression data."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, features)).astype("float32")
    y = (x @ rng.standard_normal((features, 1))).astype("float32")
    return x, y


def tiny_model(features: int = 16, width: int = 32) -> keras.Model:
    """Returns a compiled two-layer MLP."""
    model = keras.Sequential(
        [
            keras.Input((features,)),
            keras.layers.Dense(width, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer="sgd", loss="mse")
    return model


def read_scalars(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Reads every scalar (TF2 tensor summaries) in a run folder, by tag.

    The custom-scalars layout is listed under `LAYOUT_TAG` (one 0.0 per
    write); other non-scalar summaries (Keras's model config) are left out.
    """
    acc = event_accumulator.EventAccumulator(
        run_dir, size_guidance={event_accumulator.TENSORS: 0}
    )
    acc.Reload()
    result = {}
    for tag in acc.Tags()["tensors"]:
        if tag == LAYOUT_TAG:
            result[tag] = [(e.step, 0.0) for e in acc.Tensors(tag)]
            continue
        if acc.SummaryMetadata(tag).plugin_data.plugin_name != "scalars":
            continue
        result[tag] = [
            (e.step, float(tf.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)
        ]
    return result


def read_descriptions(run_dir: str) -> dict[str, str]:
    """Reads the description TensorBoard shows for each scalar tag of a run."""
    acc = event_accumulator.EventAccumulator(
        run_dir, size_guidance={event_accumulator.TENSORS: 0}
    )
    acc.Reload()
    return {
        tag: acc.SummaryMetadata(tag).summary_description
        for tag in acc.Tags()["tensors"]
        if acc.SummaryMetadata(tag).plugin_data.plugin_name == "scalars"
    }


def read_texts(run_dir: str) -> dict[str, list[tuple[int, str]]]:
    """Reads every text summary (the text plugin's) in a run folder, by tag."""
    acc = event_accumulator.EventAccumulator(
        run_dir, size_guidance={event_accumulator.TENSORS: 0}
    )
    acc.Reload()
    return {
        tag: [
            (e.step, tf.make_ndarray(e.tensor_proto).item().decode())
            for e in acc.Tensors(tag)
        ]
        for tag in acc.Tags()["tensors"]
        if acc.SummaryMetadata(tag).plugin_data.plugin_name == "text"
    }


def event_files(log_dir: str) -> list[str]:
    """Lists every event file under `log_dir`, relative to it."""
    found = glob.glob(
        os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True
    )
    return sorted(os.path.relpath(f, log_dir) for f in found)


def stock_mirrored() -> tf.distribute.MirroredStrategy:
    """Returns a stock MirroredStrategy over the two test CPUs.

    Every stock MirroredStrategy in a process starts its collective keys at
    the same value, so two of them reducing different shapes abort all
    collectives of the (shared pytest) process. Reducing to one device uses no
    collectives and is still the stock strategy.
    """
    return tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice()
    )
