"""Calibration recipes (YAML) shipped with patchattn; `patchattn.recipes` locates them by name."""
