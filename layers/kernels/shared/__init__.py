"""Pieces every kernel family uses: the online softmax and its select-based masking."""
