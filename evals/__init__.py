"""Evaluation: synthetic long-context tasks, the `patchattn eval` runner, lm-eval task files."""
