"""Triton kernels of the decode hot path, installed as ``kangaroo_fast.kernels``. One op per module, each with a
private ``@triton.jit`` kernel, one launcher and the PyTorch reference it is tested against:

    rms_norm_linear   small-M linear: RMSNorm prologue; bias, SiLU·mul (gate/up) or residual epilogues
    qkv_rope_cache    RMSNorm + q/k/v projection + RoPE + KV-cache write at per-sequence positions
    decode_attention  the T newest positions of each sequence over the static cache (causal offset from the
                      per-sequence start, GQA, sliding window, split over the key axis + merge)
    draft_head        RMSNorm + streamed LM head -> draft token, its probability, keep-drafting flag
    verify_head       RMSNorm + streamed LM head -> targets, accepted length, bonus token

``_common`` holds the block-size rule and shared device helpers, ``_interpreter`` the fixes triton's CPU
interpreter needs (applied only under TRITON_INTERPRET=1), ``_lm_head`` the streamed head both heads use,
``compile_check`` the sm_80/sm_90 compile and resource check. Importing this package imports nothing; importing a
kernel module needs triton (an optional extra: ``pip install 'kangaroo_fast[triton]'``).
"""
