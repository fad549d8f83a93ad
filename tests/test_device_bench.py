"""tools/device_bench.py, the prepared GPU command, runs end to end on a CPU with the tiny shape (so that it does not
rot between the sessions that have a device)."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "tools" / "device_bench.py"


def test_device_bench_runs_every_phase_on_the_tiny_shape(tmp_path):
    out = tmp_path / "result.json"
    command = [
        sys.executable, str(SCRIPT), "--shape", "tiny", "--context", "64", "--decode-tokens", "3",
        "--methods", "full,snapkv", "--budgets", "0.2", "--check", "--serving", "--memory-limit-gib", "0.003",
        "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["skipped"] == []
    for gaps in result["equivalence_gaps"].values():
        assert max(gap for gap in gaps.values() if gap is not None) < 0.1
    assert [(row["context"], row["batch"], row["method"]) for row in result["rows"]] == [
        (64, 1, "full"), (64, 1, "snapkv")
    ]  # fmt: skip
    [serving] = result["serving"]
    dynamic, snapkv = serving["capacity"]
    assert dynamic["method"] == "dynamic_cache" and dynamic["max_batch"] >= 1
    assert snapkv["max_batch"] > dynamic["max_batch"]  # a fifth of the cache: more sequences in flight
    assert {row["batch"] for row in serving["rows"]} == {dynamic["max_batch"]}
