"""The importer: op graphs of JAX functions, and what compiled HLO contains."""
from tag_jax.hlo.compiled import (  # noqa: F401
    Collective, collective_bytes_by_kind, collectives, compiled_flops, compiled_memory)
from tag_jax.hlo.evaluate import as_function, evaluate  # noqa: F401
from tag_jax.hlo.graph import Op, OpGraph, Role, Tensor  # noqa: F401
from tag_jax.hlo.trace import TraceError, trace, trace_jaxpr  # noqa: F401
