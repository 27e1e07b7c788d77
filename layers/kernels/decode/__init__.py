"""Decode-protocol kernels (kernels/api.py): one query per row over a cache's view.

cached (the reference cached step, block by block), ragged (contiguous caches: Pallas on
GPU / TPU, JAX reference), paged (page pools), decode_int8_mgpu (the Mosaic GPU int8
kernel), and their shared pieces (decode_common, decode_int8, decode_splits).
"""
