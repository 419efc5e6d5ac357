"""Batch scoring in the reader -> mapper -> writer shape: `candidates` (which pairs) and `features` (their
embeddings) -> `scorer` (the model, pure: pairs in, scores and contributions out) -> `writer` (top-N rows).
The `score` stage (`mmrank.stages.score`) composes them."""
