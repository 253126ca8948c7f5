"""Fused kernels (Triton on CUDA) with their plain-torch references.

Installed as ``retro.kernels``. The torch reference in each module is the CPU path and the test
oracle; the Triton path is used on CUDA unless ``RETRO_KERNELS=torch`` forces the reference.
"""
