"""An API gateway: bounded fan-out aggregation, CPU transforms in a process pool, graceful draining."""

__version__ = "0.1.0"
