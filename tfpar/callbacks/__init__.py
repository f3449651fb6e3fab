"""Keras callbacks that show per-device utilization and communication time in TensorBoard."""

from tfpar.callbacks.communication_time import CommunicationTime
from tfpar.callbacks.device_utilization import DeviceUtilization

__all__ = ["CommunicationTime", "DeviceUtilization"]
