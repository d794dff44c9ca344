"""Compute kernels for patchattn (shipped as ``patchattn.kernels``).

`reference` holds the torch implementations that run on any device and are the test oracle;
Triton kernels for CUDA live beside it and are imported lazily so CPU installs never need Triton.
"""

import sys as _sys


def _installed_hub_kernels():
    """Import Hugging Face's ``kernels`` package (a dependency of transformers) from sys.path without
    the repository root, or None when it is not installed.

    Why: this folder is ``patchattn.kernels``, but where the repository root is on sys.path (a
    REPL, ``python -c`` or ``python -m`` started there) it is also found as the top-level
    ``kernels``, shadowing that package, and ``import transformers`` then fails with
    ``cannot import name 'CUDAProperties' from 'kernels'``."""
    import importlib.machinery
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = [p for p in _sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", path)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    ours = _sys.modules.get("kernels")
    _sys.modules["kernels"] = module  # its own relative imports resolve against it
    try:
        spec.loader.exec_module(module)
    except BaseException:
        _sys.modules["kernels"] = ours
        raise
    return module


if __name__ == "kernels":
    # Imported under the top-level name: hand the name to the installed package (the import
    # system returns whatever sys.modules holds once this module has run).
    _hub = _installed_hub_kernels()
    if _hub is not None:
        _sys.modules["kernels"] = _hub
