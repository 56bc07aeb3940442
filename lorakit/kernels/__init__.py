"""Fast paths for training, each beside a pure-PyTorch reference that the CPU tests check it against.

- ``chunked_ce``: LM head + cross-entropy in row chunks, never the full (N, V) logits (``chunked_lm_loss``,
  ``causal_lm_loss`` for transformers causal LMs).
- ``lora_fused``: LoRA linear and gate/up/down LoRA MLP as autograd Functions that save only what the backward
  needs (``lora_linear``, ``lora_mlp``).
- ``small_matmul``: their rank-r products through oneDNN on CPU where that is faster than torch's fp32 GEMM
  (``rank_matmul``, reference ``rank_matmul_reference``).
- ``swiglu``, ``rms_norm``, ``rope``: elementwise / row-wise ops with Triton kernels (``_triton/``) chosen
  automatically for CUDA tensors when triton is installed (``backend.use_triton``).
- ``offload``: opt-in offloading of saved activations to pinned host memory (``offload_activations``).

Nothing here is imported by ``import lorakit``; triton is imported only when a kernel runs.
"""
