"""The composition layer: the ``posflow`` command, the main job (``posflow demo`` /
``run``), its supervisor and console, and the load test with its harness.

Everything here may import any service and the core; nothing imports this package
(tests/unit/test_layers.py checks it).
"""
