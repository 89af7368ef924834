"""One process of the two-process job in test_multihost.py (no test_ prefix: pytest skips it).

    python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR BUDGET_S

Each process owns 4 CPU devices; together they are the 8 devices of the topology preset (node k =
the devices of process k). Every process calls auto_shard on the same toy step twice: with no search
time and with BUDGET_S seconds of search (bounded by wall-clock time; auto_shard plans on process
0 and shares the plan, tag_jax/multihost.py). It saves both plans, then runs one step under
process 0's saved plan broadcast by hand (the way a user sharing a plan file would), and saves the
full results gathered from all processes.
"""
from __future__ import annotations

import os
import sys

from multihost_job import joined

LOCAL_DEVICES = 4
TOPOLOGY = "2x4-v100-25gbe"


def main(argv: list[str]) -> int:
    process_id, num_processes, port, out_dir, budget = argv
    with joined(process_id, num_processes, port, LOCAL_DEVICES):
        run(out_dir, float(budget))
    return 0


def run(out_dir: str, budget: float) -> None:
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    import tag_jax
    from tag_jax import models

    pid = jax.process_index()
    assert jax.device_count() == LOCAL_DEVICES * jax.process_count(), jax.devices()
    ex = models.get("mlp", "toy", optimizer="sgd")
    topology = tag_jax.Topology.preset(TOPOLOGY)

    def plan(budget_s: float):
        step = tag_jax.auto_shard(ex.step, jax.devices(), topology=topology,
                                  time_budget_s=budget_s, seed=0)
        return step.plan(ex.state, ex.batch)

    plan(0.0).save(os.path.join(out_dir, f"plan_seeds_{pid}.json"))
    searched = os.path.join(out_dir, f"plan_searched_{pid}.json")
    plan(budget).save(searched)

    with open(searched, "rb") as f:
        agreed_text = broadcast_bytes(f.read(), multihost_utils)
    agreed = os.path.join(out_dir, f"plan_agreed_{pid}.json")
    with open(agreed, "wb") as f:
        f.write(agreed_text)
    agreed_plan = tag_jax.Plan.load(agreed, ex.step, ex.state, ex.batch, topology=topology)

    # Host copies of the same initial values in every process (same key); device_put onto the
    # global shardings places each process's part of them on its own devices.
    state, batch = jax.device_get(ex.init(jax.random.key(0)))
    new_state, metrics = agreed_plan.jit()(*agreed_plan.shard_args(state, batch))
    leaves = jax.tree_util.tree_leaves_with_path((new_state, metrics))
    full = multihost_utils.process_allgather([a for _, a in leaves], tiled=True)
    np.savez(os.path.join(out_dir, f"result_{pid}.npz"),
             **{jax.tree_util.keystr(path): np.asarray(x) for (path, _), x in zip(leaves, full)})
    spanning = sum(not a.is_fully_addressable for _, a in leaves)
    with open(os.path.join(out_dir, f"spanning_{pid}.txt"), "w") as f:
        f.write(str(spanning))  # results that live on both processes' devices


def broadcast_bytes(data: bytes, multihost_utils) -> bytes:
    """Process 0's bytes in every process (broadcast needs equal shapes: the length goes first)."""
    import numpy as np

    n = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
    buf = np.zeros(n, np.uint8)
    src = np.frombuffer(data, np.uint8)[:n]
    buf[:len(src)] = src
    return np.asarray(multihost_utils.broadcast_one_to_all(buf)).tobytes()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
