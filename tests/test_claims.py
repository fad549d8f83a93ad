"""tools/claims.py: the claims page is what the shipped records and benchmark files give, and its verdicts follow
the paired tests."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import claims  # noqa: E402


def records(method: str, budget: float, scores: list[float]) -> list[dict]:
    return [
        {
            "task": "passkey",
            "example": f"e{i}",
            "method": method,
            "budget": budget,
            "score": score,
            "in_average": True,
            "cache_ratio": budget,
        }
        for i, score in enumerate(scores)
    ]


def test_the_shipped_page_is_what_the_files_give():
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "claims.py"), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def test_verdicts_follow_the_paired_tests():
    full = records("full", 1.0, [1.0] * 30)
    snapkv = records("snapkv", 0.2, [0.0] * 30)
    lost = claims.accuracy(full + snapkv + records("madakv", 0.2, [0.0] * 10 + [1.0] * 20), "madakv", 0.2)
    assert lost.examples == 30 and lost.p_full < 0.05 and lost.difference < 0
    assert lost.verdict == "below full; above snapkv"
    kept = claims.accuracy(full + snapkv + records("madakv", 0.2, [1.0] * 29 + [0.0]), "madakv", 0.2)
    assert kept.verdict == "not distinguishable from full; above snapkv"
    few = claims.accuracy(records("full", 1.0, [1.0] * 3) + records("madakv", 0.2, [0.0] * 3), "madakv", 0.2)
    assert few.verdict == "too few examples to decide (n=3)"
    assert claims.accuracy(full, "madakv", 0.2) is None


def test_ablations_and_method_tables_pair_each_setting_with_its_default():
    def family(method: str, budget: float, scores: list[float], task: str) -> list[dict]:
        return [{**r, "task": task} for r in records(method, budget, scores)]

    needle, deferred = "haystack/needle", "haystack/deferred"
    rows = (
        family("madakv", 0.1, [1.0] * 10, needle)
        + family("madakv(mpa=False)", 0.1, [0.0] * 10, needle)
        + family("madakv", 0.1, [1.0] * 5 + [0.0] * 5, deferred)
        + family("madakv(mpa=False)", 0.1, [1.0] * 5 + [0.0] * 5, deferred)
        + family("retentivekv", 0.1, [0.0] * 10, deferred)
        + family("snapkv", 0.1, [1.0] * 10, deferred)
        + family("random(seed=0)", 0.1, [0.0] * 10, deferred)
    )
    table = claims.ablations(rows, claims.FAMILIES)
    assert "| madakv | 0.1 | 100 (n=10) | 50 (n=10) | - |" in table
    assert "| madakv(mpa=False) | 0.1 | 0 (-100, 0.002 *) | 50 (+0, 1) | - |" in table
    versus = claims.versus_all(rows, "retentivekv", 0.1, deferred)
    # The ablation is left out; a baseline whose label carries a parameter (random's seed) is not.
    assert versus[2:] == [
        "| madakv | 10 | 50 | 0 | -50 (0.062) |",
        "| random(seed=0) | 10 | 0 | 0 | +0 (1) |",
        "| snapkv | 10 | 100 | 0 | -100 (0.002 *) |",
    ]


def test_examples_per_column_counts_the_full_cache_per_task():
    rows = records("full", 1.0, [1.0] * 3) + records("snapkv", 0.2, [0.0] * 5)
    assert claims.examples_per_column(rows) == "3"
    fidelity = [{**r, "task": "fidelity"} for r in records("full", 1.0, [0.5] * 2)]
    assert claims.examples_per_column(rows + fidelity) == "2-3"
