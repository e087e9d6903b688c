"""Triton kernels, one op per file (forward kernels, backward kernels and launchers together).

Installed as ``fastsae.kernels``. Users call the ops in ``fastsae.ops``, which dispatch here on
CUDA (or under TRITON_INTERPRET=1) and to the PyTorch reference elsewhere.
"""
