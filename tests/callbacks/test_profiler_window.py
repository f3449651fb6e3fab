"""Tests for tfpar.callbacks.profiler_window: profiler sessions and when windows open."""

import pytest
import tensorflow as tf

from tfpar.callbacks.cadence import Cadence
from tfpar.callbacks.profiler_window import ProfilerWindows, StepProfiler


def test_profiler_held_elsewhere_is_skipped_with_one_warning(
    tmp_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    tf.profiler.experimental.start(str(tmp_path / "other"))
    try:
        profiler = StepProfiler(None)
        assert not profiler.start()
        assert not profiler.start()
        assert profiler.stop() is None
        profiler.close()
    finally:
        tf.profiler.experimental.stop()
    assert sum("profiler is in use" in r.message for r in caplog.records) == 1


def _run(windows: ProfilerWindows, steps: int, epoch_steps: int) -> None:
    for step in range(steps):
        windows.begin_step(step)
        windows.end_step(step + 1, last_of_epoch=(step + 1) % epoch_steps == 0)
    windows.finish(steps)
    windows.close()


def test_untraced_windows_close_after_window_steps_or_at_the_epoch_end(
    tmp_path: str,
) -> None:
    closed: list[tuple[int, object]] = []
    windows = ProfilerWindows(
        Cadence(every_steps=4, every_seconds=None),
        2,
        None,
        str(tmp_path),
        trace=False,
        on_close=lambda step, traced: closed.append((step, traced)),
        before_capture=lambda: None,
    )
    _run(windows, steps=20, epoch_steps=10)
    # Opened after the warm-up step and every 4 steps (1, 5, 9, 13, 17); the
    # one opened at 9 ends with the epoch, at 10.
    assert closed == [(3, None), (7, None), (10, None), (15, None), (19, None)]


def test_traced_windows_give_way_to_the_kept_capture(tmp_path: str) -> None:
    closed: list[tuple[int, tuple[int, int] | None]] = []
    drained: list[bool] = []

    def on_close(step: int, traced: tuple[int, int] | None) -> None:
        windows.sampler.stop()  # what the parser thread does for the callback
        closed.append((step, traced))

    windows = ProfilerWindows(
        Cadence(every_steps=2, every_seconds=None),
        2,
        (2, 3),
        str(tmp_path / "train"),
        trace=True,
        on_close=on_close,
        before_capture=lambda: drained.append(True),
    )
    _run(windows, steps=8, epoch_steps=8)
    # The window opened at 1 is dropped when the capture of steps 2-3 starts;
    # windows due while the capture runs are not traced; later ones are.
    assert drained == [True]
    assert [step for step, _ in closed] == [5, 7, 8]
    assert [traced is None for _, traced in closed] == [True, False, False]
    assert all(t[0] < t[1] for _, t in closed if t is not None)
    assert (
        len(list((tmp_path / "train" / "plugins" / "profile").glob("*/*.xplane.pb")))
        == 1
    )
