"""Train-protocol kernels (kernels/api.py): query [B, T, N, H] over key/value [B, S, K, H].

dot_product (the reference), blockwise (pure JAX, custom VJP), ring (context parallel),
flash_tpu (splash), flash_gpu (cuDNN), flash_tokamax (Mosaic GPU), flash_pallas_gpu (Triton),
and flax_fn (a user's Flax-signature attention_fn).
"""
