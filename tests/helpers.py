"""Test helpers shared by the test modules (pytest puts tests/ on sys.path)."""

from modalkv.presses import METHODS

# Every method the registry offers: each press, and each wrapper around SnapKV. Tests that hold for every method run
# over this list, so a newly registered press is tested without editing them (as kvpress's default_presses.py).
__all__ = ["METHODS"]
