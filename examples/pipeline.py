"""Pipeline-parallel training of a deep MLP with tfpar.PipelineStrategy.

By default the host CPU is split into simulated devices (one stage each); with
`--cluster`, each stage runs in its own pinned worker process of a
`tfpar.LocalCluster`. The data is scikit-learn's bundled digits (no download;
`pip install "tfpar[examples]"`) or, with `--synthetic`, 64 random features
of 10 classes, each a noisy copy of its class's pattern.

    python examples/pipeline.py                       # 2 simulated devices
    python examples/pipeline.py --stages 3 --schedule gpipe
    python examples/pipeline.py --schedule interleaved  # 2 chunks per device
    python examples/pipeline.py --cluster             # 2 worker processes
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", type=int, default=2, help="devices (stages)")
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument(
        "--schedule", default="1f1b", choices=["1f1b", "gpipe", "interleaved"]
    )
    parser.add_argument("--recompute", action="store_true")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--cluster", action="store_true", help="use a LocalCluster")
    parser.add_argument("--synthetic", action="store_true", help="random features")
    args = parser.parse_args()

    import tfpar  # before TensorFlow starts: simulate_devices configures it

    cluster = None
    if args.cluster:
        cluster = tfpar.LocalCluster(num_workers=args.stages, pin_cores=True).start()
        devices = cluster.connect()
    else:
        devices = tfpar.simulate_devices(args.stages)

    import keras
    import numpy as np
    from digits import load_digits

    from tfpar import PipelineStrategy

    try:
        x, y = load_digits(args.synthetic)
        x = x.reshape(len(x), -1)  # 64 features
        strategy = PipelineStrategy(
            devices,
            num_microbatches=args.microbatches,
            schedule=args.schedule,
            recompute=args.recompute,
        )
        with strategy.scope():
            model = keras.Sequential(
                [keras.Input((64,))]
                + [keras.layers.Dense(128, activation="relu") for _ in range(8)]
                + [keras.layers.Dense(10)]
            )
            model.compile(
                optimizer="adam",
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"],
            )
        print("Partition:\n" + strategy.partition_model(model).format())
        print(f"\nSchedule ({args.schedule}, one step):\n" + strategy.schedule.format())
        model.fit(x[:1500], y[:1500], batch_size=64, epochs=args.epochs, verbose=2)
        _, accuracy = model.evaluate(x[1500:], y[1500:], batch_size=64, verbose=0)
        print(f"\nHeld-out accuracy: {accuracy:.3f}")

        stats = strategy.communication_stats()
        print(f"\nPer stage, over {stats.steps} training steps:")
        for d in stats.devices:
            total = d.busy_seconds + d.comm_seconds + d.idle_seconds
            print(
                f"  {d.device}: busy {d.busy_seconds:.2f}s, idle (bubble) "
                f"{d.idle_seconds:.2f}s ({d.idle_seconds / total:.0%}), "
                f"waiting for transfers {d.comm_seconds:.2f}s, "
                f"sent {d.bytes_sent / 1e6:.1f} MB"
            )

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "mlp.keras"
            model.save(path)  # a plain Keras file: loads without tfpar
            restored = keras.saving.load_model(path)
            same = np.allclose(
                restored.predict(x[:8], verbose=0),
                model.predict(x[:8], verbose=0),
                atol=1e-5,
            )
            print(f"\nSaved and reloaded with plain Keras: predictions match = {same}")
    finally:
        if cluster is not None:
            cluster.stop()


if __name__ == "__main__":
    main()
