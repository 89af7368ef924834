"""Compressed psums: ways to sum a gradient over a mesh axis that move fewer bytes.

Exact (equal to ``lax.psum`` up to summation order): sufficient-factor broadcasting of dot_general
and convolution weight gradients (:mod:`.sfb`) and row-sparse exchange of embedding gradients
(:mod:`.row_sparse`). Lossy, opt-in only: bf16 and int8 psums (:mod:`.lossy`). Each runs inside
``jax.shard_map``, differentiates and batches, and shows in jaxprs as ``jit[name=<function name>]``.
:mod:`.costs` prices every method per device from shapes, dtypes and the group size.
"""
from tag_jax.compress import costs  # noqa: F401
from tag_jax.compress.costs import Cost  # noqa: F401
from tag_jax.compress.lossy import lossy_psum_bf16, lossy_psum_int8  # noqa: F401
from tag_jax.compress.row_sparse import row_sparse_embed, row_sparse_psum  # noqa: F401
from tag_jax.compress.sfb import (  # noqa: F401
    dot_weight_shape, sfb_conv, sfb_conv_grad, sfb_dense, sfb_dot_grad)

__all__ = ["Cost", "costs", "dot_weight_shape", "lossy_psum_bf16", "lossy_psum_int8", "row_sparse_embed",
           "row_sparse_psum", "sfb_conv", "sfb_conv_grad", "sfb_dense", "sfb_dot_grad"]
