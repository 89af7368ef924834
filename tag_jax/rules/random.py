"""Random numbers from typed PRNG keys (`jax.random.key`): dropout masks, noise.

With `jax_threefry_partitionable` (JAX's default since 0.5), the bits `random_bits` draws for one
element depend only on the key and that element's index, so any block of the output is computed
where it lies with no communication, and equals that block of the unsplit draw: its dimensions
split freely (a key is replicated). Without that flag the draw depends on the shape and runs
replicated. Key plumbing (seed, split, fold_in, wrap, unwrap) is scalar-sized and runs replicated.
"""
from __future__ import annotations

import jax

from tag_jax.rules.factors import Factors, position, replicated_only
from tag_jax.rules.registry import register


def _bits_impl(params, args, strategy, mesh_axes):
    """What a device computes under `strategy`: its block of the unsplit draw (the reference of
    the validator: XLA computes only the block, by the element-index counter)."""
    out = strategy.outputs[0]
    shape = tuple(params["shape"])
    full = jax.random.bits(args[0], shape, dtype=f"uint{params['bit_width']}")
    local = out.local_shape(shape, mesh_axes)
    starts = [position(d, mesh_axes) * n if d else 0 for d, n in zip(out.dims, local)]
    return [jax.lax.dynamic_slice(full, starts, local)]


@register("random_bits")
def _random_bits(in_avals, out_avals, params):
    shape = tuple(out_avals[0].shape)
    if tuple(in_avals[0].shape) or not jax.config.jax_threefry_partitionable:
        return replicated_only([len(in_avals[0].shape)], [len(shape)])  # batched keys: as drawn
    return Factors(((),), (tuple(f"d{i}" if n > 1 else None for i, n in enumerate(shape)),),
                   impl=_bits_impl)


@register("random_seed", "random_split", "random_fold_in", "random_wrap", "random_unwrap")
def _key_plumbing(in_avals, out_avals, params):
    return replicated_only([len(a.shape) for a in in_avals], [len(a.shape) for a in out_avals])
