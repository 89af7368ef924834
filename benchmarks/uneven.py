"""Uneven plans vs the best single SPMD program: predicted step time per zoo model at real size.

Usage: python benchmarks/uneven.py [--budget 5] [--topologies tag-hetero,4xa100-4xv100]
                                   [--models gpt2:small,...] [--out benchmarks/UNEVEN.md]

For each (model, topology): the planner's best single-SPMD plan (`tag_jax.search.planner.search`,
`--budget` seconds) and the best uneven plan (`tag_jax.uneven.plan_uneven`: device groups by kind
and node, shares from the MILP, the layout and kind of group program, priced exactly), both priced by the same simulator. The zoo's steps
become `UnevenStep`s through their Task (loss over {"params", other collections}, AdamW); models
with BatchNorm (resnet, vgg if any) or capacity-based routing (moe) compute their statistics per
group when split, so their split step is not the same function: priced, not claimed exact.
"""
from __future__ import annotations

import argparse
import math
import time

import jax
import optax

import tag_jax
from tag_jax import models, uneven
from tag_jax.models._common import make_optimizer

TOPOLOGIES = "tag-hetero,4xa100-4xv100"
MODELS = "mlp:real,gpt2:small,bert:base,vit:b16,resnet:50,vgg:19,moe:base,t5:base,recommender:real"
_STATE = ("opt_state", "step")


def zoo_step(name: str, ex) -> uneven.UnevenStep:
    """The zoo example's training step in two halves (same loss and AdamW as `ex.step`)."""
    task = models.ZOO[name].task(ex.config)
    tx = make_optimizer("adamw", None)

    def grad_fn(inputs, batch):
        extra = {k: v for k, v in inputs.items() if k != "params"}

        def objective(params):
            loss, metrics, _ = task.loss({"params": params, **extra}, batch)
            return loss, metrics

        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(inputs["params"])
        return grads, {"loss": loss, **metrics}

    def apply_fn(state, grads):
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return {**state, "params": optax.apply_updates(state["params"], updates),
                "opt_state": opt_state, "step": state["step"] + 1}

    return uneven.UnevenStep(grad_fn, apply_fn, inputs=lambda s: {k: v for k, v in s.items()
                                                                 if k not in _STATE},
                             name=f"{name}_{ex.size}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=5.0, help="single-SPMD search budget per case, s")
    ap.add_argument("--topologies", default=TOPOLOGIES)
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    header = ("| model | topology | single SPMD s | SPMD plan | uneven s | ratio | groups: share (per device) | "
              "group time s | idle s | layout | combine s | apply s | chosen | uneven plan s |")
    lines = [header, "|" + "---|" * 14]
    print(header, flush=True)
    ratios: dict[str, list[float]] = {}
    for case in args.models.split(","):
        name, size = case.split(":")
        ex = models.get(name, size)
        step = zoo_step(name, ex)
        graph = tag_jax.trace(ex.step, ex.state, ex.batch)
        for topo_name in args.topologies.split(","):
            topo = tag_jax.Topology.preset(topo_name)
            t0 = time.perf_counter()
            choice = uneven.choose(ex.step, step, ex.state, ex.batch, topo, time_budget_s=args.budget,
                                   graph=graph)
            spmd_s = choice.spmd.cost.step_time_s
            p = choice.uneven
            t1 = time.perf_counter() - t0
            if p is None:
                row = (f"| {name}-{size} | {topo_name} | {spmd_s:.4f} | {choice.spmd.strategy.name} | - | "
                       f"- | {choice.why} | | | | | | spmd | {t1:.1f} |")
                ratio = 1.0
            else:
                ratio = spmd_s / p.step_time_s
                shares = "; ".join(f"{g.group.name}: {g.share} ({g.local_batch})" for g in p.groups)
                if p.left_out:
                    shares += "; left out: " + ", ".join(g.name for g in p.left_out)
                times = ", ".join(f"{g.time_s:.4f}" for g in p.groups)
                idle = ", ".join(f"{g.idle_s:.4f}" for g in p.groups)
                row = (f"| {name}-{size} | {topo_name} | {spmd_s:.4f} | {choice.spmd.strategy.name} | "
                       f"{p.step_time_s:.4f} | {ratio:.2f}x | {shares} | {times} | {idle} | L={p.local} {p.group_program} | "
                       f"{p.combine_s:.4f} | {p.apply_s:.4f} | {choice.kind} | {t1:.1f} |")
            # the chosen plan is never slower than single SPMD (auto_shard picks the faster)
            ratios.setdefault(topo_name, []).append(max(1.0, ratio))
            ratios.setdefault(topo_name + " (uneven alone)", []).append(ratio)
            lines.append(row)
            print(row, flush=True)
    summary = ["", "Geometric mean of single-SPMD / chosen step time (chosen = the faster of the two), "
               "and of single-SPMD / best uneven alone:"]
    for k, v in ratios.items():
        summary.append(f"- {k}: {math.exp(sum(map(math.log, v)) / len(v)):.3f}x over {len(v)} models")
    print("\n".join(summary))
    if args.out:
        cmd = (f"python benchmarks/uneven.py --budget {args.budget} --topologies {args.topologies} "
               f"--models {args.models} --out {args.out}")
        with open(args.out, "w") as f:
            f.write("# Uneven plans vs single SPMD: predicted step time (simulator)\n\n")
            f.write(f"Command: `{cmd}` (8 devices of each preset; 2-core machine; nothing compiled)\n\n")
            f.write("Uneven step = slowest group's program + combining program + AdamW update (not "
                    "overlapped). Layout (`tag_jax/uneven/layout.py`, column layout: L): the state "
                    "is sharded over sub-groups of L devices of one group; a group program all-gathers "
                    "the parameters within its sub-groups, then computes per-device gradients at the "
                    "local batch; the combine reduce-scatters within sub-groups and all-reduces the "
                    "1/L shards across them; the update runs on the shards. L = 1: replicated state, "
                    "one flat all-reduce, replicated update. Group programs (column layout): `rows` = "
                    "per-device gradients (shard_map, no collective but the parameter gather), "
                    "reduced in the combine; `spmd` = each group one data-parallel SPMD program of "
                    "its own (`tag_jax/uneven/group_spmd.py`, priced by the simulator with its "
                    "in-group all-reduce overlapped), the combine then only all-reduces the 1/L "
                    "chunks across sub-groups. See tag_jax/uneven/price.py.\n\n")
            f.write("\n".join(lines + summary) + "\n")


if __name__ == "__main__":
    main()
