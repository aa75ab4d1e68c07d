"""Lossy-pass machinery: the LossyPass contract, fidelity budgets, the per-unit fallback runner, calibration."""
