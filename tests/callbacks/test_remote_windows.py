"""`RemoteWindows` when a task's profiler service does not answer.

The path that traces a live task runs in
`test_device_utilization.py::test_parameter_servers_of_a_3_to_1_split_show_a_3_to_1_utilization`.
"""

import time

from tests._subprocess import free_ports
from tfpar.callbacks.remote_windows import RemoteWindows

PS = "/job:ps/replica:0/task:0/device:CPU:0"


def test_a_service_that_does_not_answer_is_an_error_not_a_sample():
    errors: list[tuple[str, BaseException]] = []
    windows = RemoteWindows(
        {PS: f"127.0.0.1:{free_ports(1)[0]}"},  # nothing listens there
        window_ms=200,
        on_error=lambda device, err: errors.append((device, err)),
    )
    began = time.monotonic()
    windows.request(step=7)
    windows.close()
    assert time.monotonic() - began < 30
    assert [device for device, _ in errors] == [PS]
    assert windows.collect() == []  # no number stands for the failed window
    windows.request(step=8)  # the next window is still tried
    windows.close()
    assert len(errors) == 2
