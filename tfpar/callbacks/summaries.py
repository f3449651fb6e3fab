"""Turning samples into TensorBoard scalars: one batched, lazy writer.

Both callbacks write into the run folder Keras's own `TensorBoard` callback
uses (`<log_dir>/train`), with the optimizer's step, so their charts sit beside
Keras's. TensorBoard merges several event files in one folder into one run.
Writes are buffered and flushed in one batch per sample, because one
`tf.summary` write per training step costs about a millisecond, and the batch
is written on a background thread, so the training thread never waits on it.

Tag scheme (device names lose their leading `/device:`; remote devices keep
their job and task, e.g. `worker:1/CPU:0`):

- `device/<device>/utilization`, `device/<device>/memory_mib`,
  `device/<device>/peak_memory_mib`; for a device whose utilization is
  unknown, a text summary at its utilization tag says so, and why
- `host/cpu_utilization`, `host/rss_mib`, `host/peak_rss_mib`
- `comm/step_time_ms`, `comm/time_ms`, `comm/compute_ms`, `comm/fraction`,
  `comm/dispatch_ms`, `comm/bytes_per_step`, `comm/bandwidth_mib_per_s`;
  `comm/straggler` (text)
- `comm/device/<device>/busy_ms`, `.../comm_ms`, `.../idle_ms` (for a pipeline
  stage: `.../bubble_ms`), `.../dispatch_ms`, `.../bytes_sent_per_step` (or
  `.../modelled_bytes_sent_per_step`), `.../wait_ms`, `.../slowest_fraction`

Each scalar's description (`definitions.py`) says what it is.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
from collections.abc import Callable

import tensorflow as tf

from tfpar._validation import check_instance, value_error

logger = logging.getLogger("tfpar")

TRAIN_RUN = "train"


def device_label(device: str) -> str:
    """Returns the short form of a device name used in tags.

    Args:
        device: A canonical device name such as `"/device:CPU:1"` or
            `"/job:worker/replica:0/task:1/device:CPU:0"`.

    Returns:
        `"CPU:1"` for a local device, `"worker:1/CPU:0"` for a remote one.

    Example:

    ```python
    device_label("/device:GPU:0")  # 'GPU:0'
    ```
    """
    spec = tf.DeviceSpec.from_string(device)
    local = f"{(spec.device_type or 'CPU').upper()}:{spec.device_index or 0}"
    if spec.job in (None, "localhost"):
        return local
    return f"{spec.job}:{spec.task or 0}/{local}"


class ScalarWriter:
    """Buffers scalars and writes them to `<log_dir>/train` in batches, off-thread.

    The odd text summary (`add_text`, e.g. why a value is unknown) goes the
    same way, into the same event file.

    The event file is created on the first flush that has something to write,
    so a callback that never samples leaves no empty file behind. `flush`
    hands the batch to one background thread and returns at once: writing a
    handful of `tf.summary` scalars and flushing the file costs about 3 ms,
    which would otherwise stall the training step it lands in. Batches are
    written in the order they were flushed; `close` waits for all of them. A
    write that fails is logged once and dropped: a measurement never stops
    training. Thread-safe: background samplers may `add` while the training
    thread flushes.

    Each tag's first scalar carries its description (TensorBoard shows it
    beside the chart), from `describe`.

    Args:
        log_dir: The log directory shared with Keras's `TensorBoard` callback.
        run: The run folder under `log_dir`. Defaults to `"train"`.
        describe: Returns a tag's description (`definitions.describe`);
            called on the writer thread, once per tag. Defaults to none.

    Example:

    ```python
    writer = ScalarWriter("runs/x")
    writer.add(10, "host/rss_mib", 812.5)
    writer.flush()
    writer.close()  # waits until the scalar is on disk
    ```
    """

    def __init__(
        self,
        log_dir: str,
        *,
        run: str = TRAIN_RUN,
        describe: Callable[[str], str] | None = None,
    ) -> None:
        self._path = os.path.join(log_dir, run)
        self._describe = describe
        self._described: set[str] = set()  # touched on the writer thread only
        self._pending: list[tuple[int, str, float]] = []
        self._texts: list[tuple[int, str, str]] = []
        self._layout: bytes | None = None
        self._lock = threading.Lock()
        self._writer: tf.summary.SummaryWriter | None = None
        self._thread: concurrent.futures.ThreadPoolExecutor | None = None
        self._failed = False

    @property
    def path(self) -> str:
        """The run folder the event file goes to."""
        return self._path

    def add(self, step: int, tag: str, value: float) -> None:
        """Queues one scalar; nothing is written until `flush`."""
        with self._lock:
            self._pending.append((step, tag, float(value)))

    def add_text(self, step: int, tag: str, text: str) -> None:
        """Queues one text summary (Markdown); nothing is written until `flush`."""
        with self._lock:
            self._texts.append((step, tag, text))

    def add_layout(self, layout: bytes) -> None:
        """Queues a serialized custom-scalars layout, written once at step 0."""
        with self._lock:
            self._layout = layout

    def flush(self) -> None:
        """Hands every queued summary to the background thread, in one batch."""
        with self._lock:
            pending, self._pending = self._pending, []
            texts, self._texts = self._texts, []
            layout, self._layout = self._layout, None
        if not pending and not texts and layout is None:
            return
        if self._thread is None:
            self._thread = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="tfpar-summary-writer"
            )
        self._thread.submit(self._write, pending, texts, layout)

    def close(self) -> None:
        """Writes what is queued, waits for every batch, closes the event file.

        A later `flush` opens a new event file.
        """
        self.flush()
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _write(
        self,
        pending: list[tuple[int, str, float]],
        texts: list[tuple[int, str, str]],
        layout: bytes | None,
    ) -> None:
        """Runs on the writer thread."""
        try:
            if self._writer is None:
                self._writer = tf.summary.create_file_writer(self._path)
            with self._writer.as_default():
                if layout is not None:
                    tf.summary.experimental.write_raw_pb(layout, step=0)
                for step, summary in self._summaries_by_step(pending).items():
                    tf.summary.experimental.write_raw_pb(summary, step=step)
                for step, tag, text in texts:
                    tf.summary.text(tag, text, step=step)
            self._writer.flush()
        except Exception as err:  # never break training over a measurement
            if not self._failed:
                self._failed = True
                logger.warning(
                    "tfpar: writing scalars to %s failed (%s: %s); dropping them. "
                    "Training continues; this is logged once.",
                    self._path,
                    type(err).__name__,
                    err,
                )

    def _summaries_by_step(
        self, pending: list[tuple[int, str, float]]
    ) -> dict[int, bytes]:
        """Packs the scalars of each step into one serialized `Summary`.

        The same records `tf.summary.scalar` writes (a float32 tensor with
        the scalars plugin's metadata, the description on a tag's first),
        but one write op per step instead of one per scalar: eager summary
        ops cost about 0.3 ms each.
        """
        from tensorboard.compat.proto import summary_pb2
        from tensorboard.plugins.scalar.summary_v2 import scalar_pb

        summaries: dict[int, summary_pb2.Summary] = {}
        for step, tag, value in pending:
            description = None
            if self._describe is not None and tag not in self._described:
                self._described.add(tag)
                description = self._describe(tag) or None
            summaries.setdefault(step, summary_pb2.Summary()).MergeFrom(
                scalar_pb(tag, value, description=description)
            )
        # In step order: a batch can hold older steps' parsed windows too.
        return {step: summaries[step].SerializeToString() for step in sorted(summaries)}


def custom_scalars_layout() -> bytes:
    """Builds tfpar's custom-scalars layout: one chart per metric, all devices in it.

    TF2 has no API for the layout (the custom-scalars plugin reads a proto
    written with `write_raw_pb`); chart tags are regular expressions, so one
    chart collects a metric from every device. The plugin keeps one layout per
    run folder, so both callbacks write this same full layout: charts of a
    callback that is not in use stay empty. Device-memory charts, which only
    GPUs fill, are left out on a machine without GPUs.

    Returns:
        The serialized `Summary` proto to pass to `ScalarWriter.add_layout`.

    Example:

    ```python
    writer.add_layout(custom_scalars_layout())
    ```
    """
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.summary.v1 import custom_scalar_pb

    gpus = bool(tf.config.list_logical_devices("GPU"))
    categories = []
    for title, charts in LAYOUT:
        category = layout_pb2.Category(title=title)
        for chart_title, pattern in charts:
            if "memory_mib" in pattern and pattern.startswith("^device") and not gpus:
                continue
            category.chart.add(title=chart_title).multiline.tag.append(pattern)
        categories.append(category)
    layout = layout_pb2.Layout(category=categories)
    return custom_scalar_pb(layout).SerializeToString()


# (category, [(chart title, tag regex)]): what `custom_scalars_layout` shows.
LAYOUT: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    (
        "tfpar: devices",
        (
            ("utilization (%)", r"^device/.+/utilization$"),
            ("memory in use (MiB)", r"^device/.+/(nvml_)?memory_mib$"),
            ("peak memory (MiB)", r"^device/.+/peak_memory_mib$"),
            ("host CPU (%)", r"^host/cpu_utilization$"),
            ("host memory (MiB)", r"^host/(peak_)?rss_mib$"),
        ),
    ),
    (
        "tfpar: communication",
        (
            (
                "step, communication and compute time (ms)",
                r"^comm/(step_time|time|compute)_ms$",
            ),
            ("communication fraction", r"^comm/fraction$"),
            ("bytes per step", r"^comm/bytes_per_step$"),
            ("effective bandwidth (MiB/s)", r"^comm/bandwidth_mib_per_s$"),
            ("dispatch time (ms/step)", r"^comm/dispatch_ms$"),
            ("busy time per device (ms/step)", r"^comm/device/.+/busy_ms$"),
            ("communication time per device (ms/step)", r"^comm/device/.+/comm_ms$"),
            (
                "idle or bubble time per device (ms/step)",
                r"^comm/device/.+/(idle|bubble)_ms$",
            ),
            (
                "bytes sent per device (modelled where tagged)",
                r"^comm/device/.+/(modelled_)?bytes_sent_per_step$",
            ),
            ("dispatch time per worker (ms/step)", r"^comm/device/.+/dispatch_ms$"),
            ("wait for the slowest replica (ms/step)", r"^comm/device/.+/wait_ms$"),
            (
                "share of synchronizations as the slowest replica",
                r"^comm/device/.+/slowest_fraction$",
            ),
        ),
    ),
)


def check_log_dir(log_dir: object) -> str:
    """Validates a callback's `log_dir` when the callback is constructed.

    Local folders are created if missing and must be writable; remote paths
    (`gs://`, `s3://`, ...) are left to `tf.io.gfile`.

    Args:
        log_dir: The argument as received.

    Returns:
        `log_dir` as a string path.

    Raises:
        TypeError: If `log_dir` is not a string or path-like.
        ValueError: If the folder cannot be created or is not writable.

    Example:

    ```python
    check_log_dir("runs/x")  # 'runs/x', created if missing
    ```
    """
    path = os.fspath(check_instance("log_dir", log_dir, (str, os.PathLike), "a path"))
    if not isinstance(path, str) or not path:
        raise value_error("log_dir", log_dir, "a non-empty path")
    if "://" in path:
        return path
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise value_error(
            "log_dir", path, f"a folder this process can create ({err})"
        ) from err
    if not os.path.isdir(path) or not os.access(path, os.W_OK | os.X_OK):
        raise value_error("log_dir", path, "a folder this process can write")
    return path
