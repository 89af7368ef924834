"""Give every test 8 simulated CPU devices, and consistent codegen for fast_compile_options().

Set before JAX initialises its backends; the library itself never touches XLA_FLAGS (house rule 5).
"""
import os

from tag_jax.models._common import FAST_COMPILE_XLA_FLAGS  # imports jax, starts no backend

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 "
    + FAST_COMPILE_XLA_FLAGS
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
