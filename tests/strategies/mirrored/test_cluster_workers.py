"""tfpar.MirroredStrategy with one replica per worker process of a LocalCluster.

Connecting to a cluster changes a process's devices for good, so the training
runs in a child process; loading the saved model runs in another one, where
tfpar cannot be imported.
"""

from __future__ import annotations

from pathlib import Path

from tests._subprocess import run_python


def test_fit_on_two_workers_matches_one_device_and_saves_without_tfpar(
    tmp_path: Path,
) -> None:
    run_python(
        f"""
        import keras, numpy as np, tensorflow as tf, tfpar

        def build():
            keras.utils.set_random_seed(3)
            model = keras.Sequential([
                keras.Input((8,)),
                keras.layers.Dense(16, activation="relu", name="hidden"),
                keras.layers.Dense(1, name="out"),
            ])
            model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                          loss="mse", metrics=["mae"])
            return model

        rng = np.random.default_rng(0)
        x = rng.normal(size=(64, 8)).astype("float32")
        y = (x[:, :3].sum(axis=1, keepdims=True) + x[:, 3:4]).astype("float32")
        reference = build()
        reference.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        expected = reference.evaluate(x, y, batch_size=16, verbose=0)
        np.save("{tmp_path}/expected.npy", reference.predict(x, verbose=0))

        with tfpar.LocalCluster(num_workers=2, pin_cores=False) as cluster:
            devices = cluster.connect()
            for bad, words in [
                ({{"devices": ["/device:CPU:0", devices[0]]}}, "all local or all remote"),
                ({{"devices": devices, "all_reduce": "collective"}}, "needs local devices"),
            ]:
                try:
                    tfpar.MirroredStrategy(**bad)
                except ValueError as err:
                    assert words in str(err), err
                else:
                    raise AssertionError(f"no error for {{bad}}")
            strategy = tfpar.MirroredStrategy(devices)
            assert strategy.num_replicas_in_sync == 2
            with strategy.scope():
                model = build()
            model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
            copies = model.get_layer("out").kernel.value.values
            assert ["task:0" in copies[0].device, "task:1" in copies[1].device] == [
                True, True], [c.device for c in copies]
            # 8 steps on the global batch of 16, each replica on 8 rows.
            for a, b in zip(reference.weights, model.weights, strict=True):
                np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
            stats = strategy.communication_stats()
            assert (stats.steps, stats.calls) == (8, 8 * 4), stats
            # Reduction to one device: replica 1 sends its gradients to replica
            # 0, which sends the sum back.
            assert [d.bytes_sent for d in stats.devices] == [stats.bytes_moved] * 2
            evaluated = model.evaluate(x, y, batch_size=16, verbose=0)
            np.testing.assert_allclose(evaluated, expected, rtol=1e-5)
            model.save("{tmp_path}/m.keras")
            np.save("{tmp_path}/x.npy", x)
            # Gradient accumulation reduces inside a tf.cond: a clear error,
            # at the first step, naming the option.
            with strategy.scope():
                accumulating = build()
                accumulating.compile(
                    optimizer=keras.optimizers.SGD(0.05, gradient_accumulation_steps=2),
                    loss="mse")
            try:
                accumulating.fit(x, y, batch_size=16, epochs=1, verbose=0)
            except ValueError as err:
                assert "gradient_accumulation_steps" in str(err), err
                assert "cluster workers" in str(err), err
            else:
                raise AssertionError("gradient_accumulation_steps trained remotely")
        print("OK")
        """,
        timeout=240,
    )
    run_python(
        f"""
        import sys
        sys.modules["tfpar"] = None  # any import of tfpar now fails
        import numpy as np, keras
        model = keras.models.load_model("{tmp_path}/m.keras")
        got = model.predict(np.load("{tmp_path}/x.npy"), verbose=0)
        np.testing.assert_allclose(
            got, np.load("{tmp_path}/expected.npy"), rtol=1e-5, atol=1e-6)
        """
    )
