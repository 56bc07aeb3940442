"""Triton kernels (imported only when a CUDA tensor, or TRITON_INTERPRET=1, asks for one).

Each module holds tiny ``@triton.jit`` kernels and thin launchers; the reference for each lives beside its
dispatcher one package up (``lorakit.kernels.swiglu``, ``rms_norm``, ``rope``).
"""
