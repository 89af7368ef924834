"""The benchmark zoo: Flax (linen) training steps with optax, from toy to real size.

    ex = tag_jax.models.get("gpt2", "small")          # abstract: nothing is allocated
    jax.eval_shape(ex.step, ex.state, ex.batch)
    state, batch = tag_jax.models.get("gpt2").init(jax.random.key(0))   # toy: concrete arrays

`get(name, size, optimizer="adamw"|"sgd"|<optax transform>, learning_rate=None, **overrides)`:
overrides replace fields of the size's config dataclass (e.g. batch=8, scan_layers=True).
A step is `step(state, batch) -> (new_state, metrics)` with `metrics["loss"]` in float32 and
`state = {"params", "opt_state", "step"}` (+ "batch_stats" for BatchNorm models).
"""
from tag_jax.models import bert, gpt2, llama, mlp, moe, recommender, resnet, t5, vgg, vit
from tag_jax.models._common import (Example, ModelSpec, Task, count_params, fast_compile_options,
                                    FAST_COMPILE_XLA_FLAGS, make_optimizer)

ZOO: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (mlp.SPEC, gpt2.SPEC, bert.SPEC, vit.SPEC, resnet.SPEC, vgg.SPEC, moe.SPEC,
                 t5.SPEC, recommender.SPEC)
}

# Not in the benchmark zoo: models nothing was tuned on, to check that rules, baselines and the
# simulator carry over (`get` finds them; `names` and the benchmarks' zoo lists leave them out).
EXTRA: dict[str, ModelSpec] = {llama.SPEC.name: llama.SPEC}


def names() -> tuple[str, ...]:
    return tuple(ZOO)


def _spec(name: str) -> ModelSpec:
    if name in EXTRA:
        return EXTRA[name]
    if name not in ZOO:
        raise KeyError(f"no model {name!r} in the zoo; models: {list(ZOO)} (and, outside the zoo, "
                       f"{list(EXTRA)})")
    return ZOO[name]


def sizes(name: str) -> tuple[str, ...]:
    return _spec(name).sizes()


def get(name: str, size: str = "toy", **options) -> Example:
    """Build one example (abstract state and batch); see the module docstring for options."""
    return _spec(name).get(size, **options)


__all__ = ["ZOO", "EXTRA", "Example", "ModelSpec", "Task", "get", "names", "sizes", "count_params",
           "fast_compile_options", "FAST_COMPILE_XLA_FLAGS", "make_optimizer"]
