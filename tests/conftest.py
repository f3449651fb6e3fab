"""Test bed: two simulated CPU devices, configured once for the whole process.

TensorFlow configures devices only once per process, so this runs before any
test module imports TensorFlow. Tests that need another device count, or
cluster processes, run in a subprocess (`tests/_subprocess.py`).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tfpar

NUM_TEST_DEVICES = 2
tfpar.simulate_devices(NUM_TEST_DEVICES)
