"""The /transform commands the demo prints, pasted into a shell against a real `gateway serve`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from app.demo.runner import transform_npy_examples
from tests.compute.helpers import trig_log_reference
from tests.support.gateway import gateway_process

CONFIG = """
[server]
log_format = "text"
drain_delay_s = 0
[compute]
workers = 1
load_plugins = false
"""


def test_the_printed_npy_examples_work(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(CONFIG)
    with gateway_process(config, tmp_path) as gw:
        lines = [line.strip() for line in transform_npy_examples(gw.url, sys.executable).splitlines()]
        commands = [line for line in lines if line and not line.startswith("#")]
        outputs = [
            subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=30)
            for command in commands
        ]
    assert all(out.returncode == 0 for out in outputs), [out.stderr for out in outputs]
    x = np.linspace(-3, 3, 7)
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), trig_log_reference(x))
    printed = np.array(outputs[2].stdout.strip().strip("[]").split(), dtype=np.float64)
    np.testing.assert_allclose(printed, trig_log_reference(x), rtol=1e-6)
    stats = json.loads(outputs[3].stdout)["result"]
    assert stats["count"] == 7
    assert stats["percentiles"] == {"50": 0.0, "90": float(np.percentile(x, 90))}
