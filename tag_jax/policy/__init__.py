"""The learned policy: a jraph GNN over the op-group graph and the device topology (TAG's model).

    policy = tag_jax.policy.default_policy()        # shipped weights, or None
    guides = policy.guide(graph, topology, meshes)  # per mesh: preferred decision, move prior

Modules: `features` (the joint GraphsTuple), `network` (flax), `store` (weights as npz with schema
version), `guide` (inference, the policy's plan), `zoo` / `teacher` / `dataset` / `train`
(`python -m tag_jax.policy.train` retrains from scratch).
"""
from tag_jax.policy.features import SCHEMA_VERSION
from tag_jax.policy.guide import Guide, Policy, default_policy, policy_plan, resolve
from tag_jax.policy.store import SchemaMismatchError

__all__ = ["SCHEMA_VERSION", "Guide", "Policy", "SchemaMismatchError", "default_policy",
           "policy_plan", "resolve"]
