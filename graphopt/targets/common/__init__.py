"""Lowering code that several backends share: channels-last layout, torch weight-only kernels."""
