"""Uneven plans vs the best single SPMD program: predicted step time per zoo model at real size.

Usage: python benchmarks/uneven.py [--budget 5] [--topologies tag-hetero,4xa100-4xv100]
                                   [--models gpt2:small,...] [--out benchmarks/UNEVEN.md]
                                   [--results benchmarks/RESULTS.md] [--ceiling-only]
                                   [--fidelity [--fidelity-out benchmarks/UNEVEN_FIDELITY.md]]

For each (model, topology): the planner's best single-SPMD plan (`tag_jax.search.planner.search`,
`--budget` seconds) and the best uneven plan (`tag_jax.uneven.plan_uneven`: device groups by kind
and node, shares from the MILP, the layout and kind of group program, priced exactly), both priced by the same simulator. The zoo's steps
become `UnevenStep`s through their Task (loss over {"params", other collections}, AdamW); models
with BatchNorm (resnet, vgg if any) or capacity-based routing (moe) compute their statistics per
group when split, so their split step is not the same function: priced, not claimed exact.

`--results`: the ratios are also given against the best single-SPMD plan known for the case, the
fastest of this run's, RESULTS.md's tag_jax plan and RESULTS.md's ILP plan (the same simulator:
a run whose planner is slowed by load may miss a plan its search finds otherwise).
The compute ceiling (`ceiling`): per model and topology, the simulator's per-device compute of the
gradient step at the even local batch on each device kind, and the ideal speed-up of using every
device over only those of the fastest kind with zero communication (sum of throughputs / the
fastest kind's): the upper bound on what uneven work can gain over a plan on the fastest devices.

`--fidelity`: for each (model, topology) uneven plan it computes, lower and compile (on abstract
inputs, nothing run) each group's program, the combining program and the update (`UnevenProgram.
compiled`; mode "one": the one program) on 8 CPU devices that the topology describes, and compare
each program's collectives, kind by kind (`tag_jax.hlo`: per-device bytes of each collective's
result; XLA:CPU's all-reduce feeding 1/n slices counts as a reduce-scatter), with the plan's
prediction (`UnevenProgram.predicted_collectives`); a cell is outside when off by more than 10%.
`--fidelity-out FILE` writes that table. The programs compile with `fast_compile_options()` as XLA_FLAGS (LLVM
backend optimisation off: the collectives are fixed by XLA's HLO passes before the backend).
`--ceiling-only` and the compute-ceiling table are skipped with `--fidelity` unless `--out` is given.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

if "--fidelity" in sys.argv:  # before jax starts: 8 CPU devices stand for the topology's 8
    from tag_jax.models._common import FAST_COMPILE_XLA_FLAGS  # (see fast_compile_options)

    # fast_compile_options() as flags: UnevenProgram's mode-"spmd" group programs nest the planned
    # jit, and jax refuses compiler_options on a nested jit
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 "
                               + FAST_COMPILE_XLA_FLAGS + " --xla_backend_optimization_level=0"
                               " --xla_cpu_use_fusion_emitters=false").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

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


def read_results(path: str) -> dict[tuple[str, str], float]:
    """{(model, topology): fastest single-SPMD step time} from a RESULTS.md table (tag_jax, ILP)."""
    out: dict[tuple[str, str], float] = {}
    try:
        text = open(path).read()
    except OSError:
        return out
    header = None
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[:3] == ["model", "topology", "tag_jax s"]:
            header = cells
            continue
        if header is None or len(cells) != len(header) or cells[0].startswith("---"):
            continue
        row = dict(zip(header, cells))
        times = []
        for col in ("tag_jax s", "ILP s"):
            try:
                v = float(row.get(col, "nan"))
            except ValueError:
                continue
            if math.isfinite(v):
                times.append(v)
        if times:
            out[(row["model"], row["topology"])] = min(times)
    return out


def ceiling(step: uneven.UnevenStep, ex, topo) -> tuple[dict[str, float], float, float]:
    """({kind: compute s per example on one device}, ideal speed-up of all devices over the
    fastest kind's, and over all devices at an even split (the slowest device's pace)), with zero
    communication, at the even local batch."""
    pricer = uneven.Pricer(step, ex.state, ex.batch, topo)
    b = max(1, pricer.n // topo.num_devices)
    per_kind: dict[str, float] = {}
    count: dict[str, int] = {}
    for i in topo.ids:
        k = topo.device(i).kind
        if k not in per_kind:
            per_kind[k] = pricer.probe(b, i).time_s / b
        count[k] = count.get(k, 0) + 1
    fastest = min(per_kind, key=per_kind.get)
    total = sum(count[k] / per_kind[k] for k in per_kind)
    slowest = max(per_kind.values())
    return per_kind, total / (count[fastest] / per_kind[fastest]), total / (sum(count.values()) / slowest)


# the SPMD fidelity benchmark's kinds, bound and ratio cells (benchmarks/fidelity.py; importing it
# also asks for 8 CPU devices, which the simulator-only runs do not use)
from fidelity import COMM_BOUND as FIDELITY_BOUND, KINDS as FIDELITY_KINDS  # noqa: E402
from fidelity import _outside, _ratio as ratio_text  # noqa: E402


def _program_label(name: str) -> str:
    """"group v100@node0" -> "v100@node0"; "one program" -> "one"; "combine", "apply" as they are."""
    return name[len("group "):] if name.startswith("group ") else ("one" if name == "one program" else name)


def fidelity_cells(step: uneven.UnevenStep, ex, plan) -> tuple[list[tuple[str, str, int, int]], float]:
    """[(program, kind, predicted bytes, compiled bytes)] of every program of `plan`, compiled on
    abstract inputs at real size (compile only), and the compile wall time."""
    from tag_jax.hlo import collective_bytes_by_kind, collectives

    t0 = time.perf_counter()
    program = uneven.UnevenProgram(step, plan)  # fast-compile XLA_FLAGS: see the top of this file
    predicted = program.predicted_collectives()
    compiled = program.compiled(ex.state, ex.batch)
    cells = []
    for name, c in compiled.items():
        real = collective_bytes_by_kind(collectives(c))
        pred = predicted.get(name, {})
        mine = [(k, int(pred.get(k, 0)), int(real.get(k, 0))) for k in FIDELITY_KINDS
                if pred.get(k, 0) or real.get(k, 0)]
        for k in sorted(set(pred) | set(real)):
            if k not in FIDELITY_KINDS and (pred.get(k, 0) or real.get(k, 0)):
                mine.append((k, int(pred.get(k, 0)), int(real.get(k, 0))))
        cells += [(_program_label(name), k, p, r) for k, p, r in mine] or [(_program_label(name), "none", 0, 0)]
    return cells, time.perf_counter() - t0


FIDELITY_NOTES = """\
Notes:
- Bytes are per device, each collective's result (`tag_jax.hlo`), summed by kind per program; "none":
  the program compiles with no collective and none is predicted. `apply` (the AdamW update on the
  layout's shards) is predicted to need no collective.
- Programs: `<group>` = that group's program (mode `rows`: the parameter all-gather within the
  sub-groups; mode `spmd`: the group's own data-parallel SPMD program, collectives as the simulator
  prices them, plus the same gather), `combine` = the combining program, `one` = mode "one"'s single
  program (the peeled last microbatch's all-reduce; the update inside it).
- Mode `one`: the compiled program is a shard_map whose only collectives are the psums of every
  gradient and metric leaf, one all-reduce of all of them (gpt2-small: 497,759,236 B), and that is
  what `tag_jax.uneven.one` predicts and prices (one all-reduce per leaf as the peeled last
  microbatch's backward produces it). Until 2026-12-01 it took the simulator's data-parallel GSPMD
  strategy at the microbatch instead, which reduce-scatters and gathers the tied embedding's
  gradient and adds an all-to-all the program never runs (gpt2 all-reduce 0.690, bert 0.786).
- Mode `spmd` (each group its own data-parallel SPMD program): the program returns every gradient
  whole; where the data-parallel strategy leaves one sharded (gpt2's tied embedding: the
  scatter-add half of its gradient comes sharded on the hidden dimension; bert/t5/moe embeddings,
  recommender-real's 8.9 GB of tables), XLA all-gathers it back, and `group_spmd.group_strategy`
  prices that gather (each result carried back to a replicated input of its shape). With one
  sub-group per group (|g| = L) XLA keeps only this device's chunk of each all-reduced gradient, a
  reduce-scatter; `tag_jax.uneven.search._priced` moves to reduce-scatter only the results the
  strategy all-reduces at the end (before 2026-12-01 it subtracted every sharded leaf, and the
  all-reduce went negative: gpt2 -49x, recommender's reduce-scatter 1588x).
- Mode `rows` (resnet-50): the group programs' all-gather is 0.2% below the prediction: the
  prediction gathers every sharded input leaf, BatchNorm's running statistics included; in training
  mode they are not read, so XLA drops their gathers (dead code). Within the bound; not widened.
- Compile flags: `fast_compile_options()` as XLA_FLAGS; mlp-real on tag-hetero compiled without them
  gives the same collectives byte for byte.
"""


def geomean(v) -> float:
    return math.exp(sum(map(math.log, v)) / len(v)) if v else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=5.0, help="single-SPMD search budget per case, s")
    ap.add_argument("--topologies", default=TOPOLOGIES)
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--out", default=None)
    ap.add_argument("--results", default="benchmarks/RESULTS.md",
                    help="RESULTS.md whose single-SPMD plans (tag_jax, ILP) the ratios also take")
    ap.add_argument("--ceiling-only", action="store_true", help="only the compute-ceiling table")
    ap.add_argument("--fidelity", action="store_true",
                    help="also compile every program of each uneven plan (8 CPU devices, abstract inputs) "
                         "and compare its collectives with the prediction")
    ap.add_argument("--fidelity-out", default=None, help="write the fidelity table to this file")
    args = ap.parse_args()
    fid_lines = ["| model | topology | program | kind | predicted B | compiled B | ratio |",
                 "|---|---|---|---|---|---|---|"]
    fid_outside: list[str] = []
    fid_worst: dict[str, float] = {}
    fid_times: list[str] = []

    def write_fidelity() -> None:
        if not args.fidelity_out:
            return
        cmd = " ".join(["python", "benchmarks/uneven.py"] + sys.argv[1:])
        with open(args.fidelity_out, "w") as f:
            f.write("# Uneven plans: compiled collectives vs predicted, program by program (real size)\n\n")
            f.write(f"Command: `{cmd}`\n\n")
            f.write("8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8) described by the "
                    "topology; each program of the best uneven plan lowered and compiled on abstract inputs "
                    "(jax.ShapeDtypeStruct), nothing run. Bound: collectives within "
                    f"{FIDELITY_BOUND:.0%} by kind.\n\n")
            f.write("\n".join(fid_lines) + "\n\n")
            n_cells = len(fid_lines) - 2
            f.write(f"Cells outside {FIDELITY_BOUND:.0%}: {len(fid_outside)} of {n_cells}"
                    + (": " + "; ".join(fid_outside) if fid_outside else "") + "\n\n")
            f.write("Worst |ratio - 1| per program kind: " + ", ".join(
                f"{k} {v:.3f}" for k, v in sorted(fid_worst.items())) + "\n\n")
            f.write("Per case (plan, compile wall time): " + "; ".join(fid_times) + "\n\n")
            f.write(FIDELITY_NOTES)

    def check(name, size, topo_name, step, ex, p) -> None:
        mode = (f"one m={p.microbatch}" if p.group_program == "one" else f"L={p.local} {p.group_program}")
        try:
            cells, dt = fidelity_cells(step, ex, p)
        except Exception as e:  # noqa: BLE001  (a case that cannot compile is reported, not fatal)
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            fid_lines.append(f"| {name}-{size} | {topo_name} | ({mode}) | error | | | {msg} |")
            fid_outside.append(f"{name}-{size}/{topo_name} did not compile")
            print(fid_lines[-1], flush=True)
            write_fidelity()
            return
        fid_times.append(f"{name}-{size}/{topo_name} {mode} {dt:.0f} s")
        for prog, kind, pr, real in cells:
            role = prog if prog in ("combine", "one", "apply") else "group"
            if pr or real:
                dev = abs(pr / real - 1) if real else math.inf
                fid_worst[role] = max(fid_worst.get(role, 0.0), dev)
            fid_lines.append(f"| {name}-{size} | {topo_name} | {prog} | {kind} | {pr:,} | {real:,} | "
                             f"{ratio_text(pr, real)} |")
            if _outside(kind, pr, real):
                fid_outside.append(f"{name}-{size}/{topo_name} {prog} {kind} {ratio_text(pr, real)}")
            print(fid_lines[-1], flush=True)
        print(f"# compiled {name}-{size} on {topo_name} ({mode}) in {dt:.0f} s", flush=True)
        write_fidelity()

    known = read_results(args.results) if args.results else {}
    ceil_lines = ["| model | topology | compute s/example per device kind | ideal speed-up over the fastest kind alone | "
                  "ideal speed-up over an even split on all devices |", "|---|---|---|---|---|"]
    ceilings: dict[str, list[float]] = {}
    evens: dict[str, list[float]] = {}
    for case in (args.models.split(",") if not args.fidelity or args.out or args.ceiling_only else []):
        name, size = case.split(":")
        ex = models.get(name, size)
        step = zoo_step(name, ex)
        for topo_name in args.topologies.split(","):
            per_kind, ideal, even = ceiling(step, ex, tag_jax.Topology.preset(topo_name))
            kinds = ", ".join(f"{k} {v:.3g}" for k, v in per_kind.items())
            ceil_lines.append(f"| {name}-{size} | {topo_name} | {kinds} | {ideal:.3f}x | {even:.3f}x |")
            ceilings.setdefault(topo_name, []).append(ideal)
            evens.setdefault(topo_name, []).append(even)
            print(ceil_lines[-1], flush=True)
    ceil_summary = [f"- {k}: geometric mean {geomean(v):.3f}x over the fastest kind alone, {geomean(evens[k]):.3f}x "
                    f"over an even split, {len(v)} models" for k, v in ceilings.items()]
    print("\n".join(ceil_summary), flush=True)
    if args.ceiling_only:
        return
    header = ("| model | topology | single SPMD s | SPMD plan | uneven s | ratio | groups: share (per device) | "
              "group time s | idle s | layout | combine s | apply s | chosen | uneven plan s | "
              "best single SPMD s | ratio vs best |")
    lines = [header, "|" + "---|" * 16]
    best_ratios: dict[str, list[float]] = {}
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
            best_s = min(spmd_s, known.get((f"{name}-{size}", topo_name), math.inf))
            if p is None:
                row = (f"| {name}-{size} | {topo_name} | {spmd_s:.4f} | {choice.spmd.strategy.name} | - | "
                       f"- | {choice.why} | | | | | | spmd | {t1:.1f} | {best_s:.4f} | - |")
                ratio, best_ratio = 1.0, 0.0
            else:
                ratio = spmd_s / p.step_time_s
                best_ratio = best_s / p.step_time_s
                shares = "; ".join(f"{g.group.name}: {g.share} ({g.local_batch})" for g in p.groups)
                if p.left_out:
                    shares += "; left out: " + ", ".join(g.name for g in p.left_out)
                times = ", ".join(f"{g.time_s:.4f}" for g in p.groups)
                idle = ", ".join(f"{g.idle_s:.4f}" for g in p.groups)
                mode = (f"one m={p.microbatch} x({','.join(map(str, p.counts))})" if p.group_program == "one"
                        else f"L={p.local} {p.group_program}")
                row = (f"| {name}-{size} | {topo_name} | {spmd_s:.4f} | {choice.spmd.strategy.name} | "
                       f"{p.step_time_s:.4f} | {ratio:.2f}x | {shares} | {times} | {idle} | {mode} | "
                       f"{p.combine_s:.4f} | {p.apply_s:.4f} | {choice.kind} | {t1:.1f} | {best_s:.4f} | "
                       f"{best_ratio:.2f}x |")
            # the chosen plan is never slower than single SPMD (auto_shard picks the faster)
            ratios.setdefault(topo_name, []).append(max(1.0, ratio))
            ratios.setdefault(topo_name + " (uneven alone)", []).append(ratio)
            best_ratios.setdefault(topo_name, []).append(max(1.0, best_ratio))
            best_ratios.setdefault(topo_name + " (uneven alone)", []).append(best_ratio)
            lines.append(row)
            print(row, flush=True)
            if args.fidelity and p is not None:
                check(name, size, topo_name, step, ex, p)
    summary = ["", "Geometric mean of single-SPMD / chosen step time (chosen = the faster of the two), "
               "and of single-SPMD / best uneven alone:"]
    for k, v in ratios.items():
        summary.append(f"- {k}: {geomean(v):.3f}x over {len(v)} models")
    summary += ["", "The same against the best single-SPMD plan known (this run's, or RESULTS.md's tag_jax or "
                "ILP plan, whichever is fastest; column 'best single SPMD s'); a model with no uneven plan "
                "counts 1.0x for the chosen plan and is left out of 'uneven alone':"]
    for k, v in best_ratios.items():
        v = [x for x in v if x > 0]
        summary.append(f"- {k}: {geomean(v):.3f}x over {len(v)} models")
    summary += ["", "Compute ceiling (zero communication; `ceiling` in benchmarks/uneven.py):", ""]
    summary += ceil_lines + [""] + ceil_summary
    print("\n".join(summary))
    if args.out:
        cmd = (f"python benchmarks/uneven.py --budget {args.budget} --topologies {args.topologies} "
               f"--models {args.models} --results {args.results} --out {args.out}")
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
                    "chunks across sub-groups. Layout `one m=M x(c_1,...)` = one program over all "
                    "the devices taking part (`tag_jax/uneven/one.py`): each device of group g runs "
                    "c_g microbatches of M examples, the last one peeled out of the loop so that its "
                    "gradient all-reduce overlaps its backward pass (priced inside the group time; "
                    "combine 0); replicated AdamW update. See tag_jax/uneven/price.py.\n\n")
            f.write("\n".join(lines + summary) + "\n")


if __name__ == "__main__":
    main()
