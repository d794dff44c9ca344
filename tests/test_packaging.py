"""The checkout's layout against the installed environment."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_checkout_root_on_sys_path_does_not_shadow_hub_kernels():
    """From the repository root (a REPL, `python -c`, `python -m`) the top-level kernels/ folder is
    first on sys.path; it must not hide Hugging Face's `kernels` package, which transformers
    imports, nor stop patchattn.kernels from being ours."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    code = ("import kernels, patchattn, patchattn.kernels.reference, transformers.integrations.hub_kernels; "
            "print(kernels.__file__); print(patchattn.kernels.__file__)")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    top, ours = res.stdout.split()
    assert Path(ours).parent == ROOT / "kernels"
    hub = importlib.util.find_spec("kernels")  # this process runs without the root on sys.path
    if hub is not None and Path(hub.origin).parent != ROOT / "kernels":
        assert Path(top) == Path(hub.origin)
