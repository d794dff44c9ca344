"""Compute kernels for patchattn (shipped as ``patchattn.kernels``).

`reference` holds the torch implementations that run on any device and are the test oracle;
Triton kernels for CUDA live beside it and are imported lazily so CPU installs never need Triton.
"""
