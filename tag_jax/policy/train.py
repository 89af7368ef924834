"""Retrain the policy from scratch: `python -m tag_jax.policy.train [--problems 90] [--epochs 20]`.

1. searches random problems (`zoo`) with the teacher, the planner's whole search on every candidate
   mesh (`teacher`, `--budget` seconds per mesh), caching each on disk (`dataset`; a rerun resumes);
2. builds the joint graphs, holds out the last tenth of the problems for validation;
3. prices the hand-written seeds of `--seed-problems` more random problems at 1-32x the batch
   (no search; `dataset.generate_seeds`, cached too), the ranking head's extra data;
4. fits `PolicyNet` by imitation (cross-entropy on each parameter group's and op class's option in
   the teacher's final plan and on the best meshes, a squared loss on the value head, and a
   cross-entropy over each problem's seeds on the fastest ones for the ranking head) with
   optax AdamW and gradient clipping, stopping after `--max-minutes` of fitting at the latest;
5. writes `tag_jax/policy/weights/policy.npz` with the feature schema and teacher versions.

About 27 minutes on two shared CPU cores with empty caches (searching 90 problems ~7, pricing the
seeds of 300 ~7.5, features ~5.5, fitting ~7.5), about 13 with full ones (benchmarks/POLICY.md).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tag_jax.policy import dataset, features, store
from tag_jax.policy.network import PolicyNet

CONFIG = {"hidden": 64, "layers": 3, "heads": 4}
MAX_NODES = 2048  # per training batch (padded to a power of two)
RARE_WEIGHT = 3.0
RANK_WEIGHT = 1.0


def loss_fn(params, net, g):
    out = net.apply({"params": params}, g)
    nodes, glob = g.nodes, g.globals
    logp = jax.nn.log_softmax(out["options"], axis=-1)
    nll = -jnp.take_along_axis(logp, nodes["label"][:, None], axis=1)[:, 0]
    # The rarer choices other than option 0 (replication) count RARE_WEIGHT times: otherwise the
    # fit lingers on "replicate everything", right for most labels and useless where it is not.
    has = nodes["has_label"] * jnp.where(nodes["label"] > 0, RARE_WEIGHT, 1.0)
    # Argument shardings (a few group nodes) and op options (many class nodes) weigh the same.
    is_class = (nodes["type"] == features.CLASS) * (has > 0)
    w_class, w_unit = has * is_class, has * (1 - is_class)
    option_loss = ((nll * w_unit).sum() / jnp.maximum(w_unit.sum(), 1e-6)
                   + (nll * w_class).sum() / jnp.maximum(w_class.sum(), 1e-6))
    correct = (jnp.argmax(out["options"], -1) == nodes["label"]) * has
    # Mesh: softmax over the graphs of one problem (same `inst`); segment 0 is padding.
    n_seg = glob["inst"].shape[0] + 1
    inst, valid = glob["inst"], glob["valid"]
    logit = jnp.where(valid > 0, out["mesh"], -1e9)
    top = jax.ops.segment_max(logit, inst, n_seg)
    lse = jnp.log(jax.ops.segment_sum(jnp.exp(logit - top[inst]), inst, n_seg)) + top
    target = glob["best"] * valid
    mesh_loss = -((logit - lse[inst]) * target).sum() / jnp.maximum(target.sum(), 1.0)
    mesh_hit = (jax.ops.segment_max(logit, inst, n_seg)[inst] == logit) * target
    value_loss = (((out["value"] - glob["value"]) ** 2) * valid).sum() / jnp.maximum(valid.sum(), 1.0)
    # Seeds: softmax over the seeds one graph of each problem carries; the best ones are the target.
    rank_logp = jax.nn.log_softmax(out["rank"], axis=-1)
    has_rank = (glob["cand_best"].sum(-1) > 0).astype(valid.dtype)  # (ranking-only graphs: valid 0)
    tgt = glob["cand_best"] / jnp.maximum(glob["cand_best"].sum(-1, keepdims=True), 1e-6)
    rank_loss = (-(jnp.where(glob["cand_mask"], rank_logp, 0.0) * tgt).sum(-1) * has_rank).sum() \
        / jnp.maximum(has_rank.sum(), 1.0)
    top_seed = jnp.argmax(out["rank"], -1)
    rank_hit = jnp.take_along_axis(glob["cand_best"], top_seed[:, None], 1)[:, 0] * has_rank
    total = option_loss + 0.5 * mesh_loss + 0.5 * value_loss + RANK_WEIGHT * rank_loss
    stats = {"option": option_loss, "mesh": mesh_loss, "value": value_loss,
             "option_hits": correct.sum(), "options": has.sum(),
             "class_hits": (correct > 0).sum(where=is_class > 0), "classes": is_class.sum(),
             "unit_hits": (correct > 0).sum(where=(has > 0) & (is_class == 0)),
             "units": ((has > 0) & (is_class == 0)).sum(),
             "mesh_hits": mesh_hit.sum(), "meshes": target.sum(), "rank": rank_loss,
             "rank_hits": rank_hit.sum(), "ranked": has_rank.sum()}
    return total, stats


def batches(problems, max_nodes: int = MAX_NODES) -> list:
    """Padded batches of whole problems (all meshes of a problem together), problems of similar
    size together, packed up to `max_nodes` nodes (a larger problem alone) and 63 graphs: fixed
    once, and nearly all of one padded shape, so the training step compiles once or twice."""
    size = [sum(int(g.n_node[0]) for g in p) for p in problems]
    order = sorted(range(len(problems)), key=lambda k: size[k])
    groups, cur, nodes, n_graphs = [], [], 0, 0
    for k in order:
        if cur and (nodes + size[k] > max_nodes or n_graphs + len(problems[k]) > 63):
            groups.append(cur)
            cur, nodes, n_graphs = [], 0, 0
        cur.append(k)
        nodes += size[k]
        n_graphs += len(problems[k])
    if cur:
        groups.append(cur)
    out = []
    for members in groups:
        graphs = []
        for j, k in enumerate(members):
            for g in problems[k]:
                graphs.append(g._replace(globals=dict(g.globals, inst=np.array([j + 1], np.int32))))
        out.append(features.pad(graphs, n_graph=64))
    return out


def fit(problems, val, epochs: int, seed: int = 0, lr: float = 3e-3, show: bool = True,
        max_minutes: float = 12.0):
    net = PolicyNet(**CONFIG)
    rng = np.random.default_rng(seed)
    train_batches = batches(problems)
    params = jax.jit(net.init)(jax.random.key(seed), train_batches[0])["params"]
    steps = epochs * len(train_batches)
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10), steps, lr * 0.05)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=1e-4))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, g):
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, net, g)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, stats

    evaluate = jax.jit(lambda p, g: loss_fn(p, net, g)[1])
    t0 = time.perf_counter()
    for epoch in range(epochs):
        tot = {}
        for b in rng.permutation(len(train_batches)):
            params, opt_state, stats = step(params, opt_state, train_batches[b])
            for k, v in stats.items():
                tot[k] = tot.get(k, 0.0) + float(v)
        if show:
            dataset.progress(epoch + 1, epochs, t0,
                             f"training (option acc {tot['option_hits'] / max(tot['options'], 1):.2f},"
                             f" mesh acc {tot['mesh_hits'] / max(tot['meshes'], 1):.2f},"
                             f" seed acc {tot['rank_hits'] / max(tot['ranked'], 1):.2f})")
        if time.perf_counter() - t0 > 60 * max_minutes:
            print(f"\nstopping after {epoch + 1} epochs: {max_minutes} min training limit",
                  file=sys.stderr)
            break
    report = {"train_" + k: v for k, v in _metrics(evaluate, params, problems).items()}
    report.update({"val_" + k: v for k, v in _metrics(evaluate, params, val).items()})
    report["train_seconds"] = time.perf_counter() - t0
    return params, report


def _metrics(evaluate, params, problems) -> dict:
    tot = {}
    for g in batches(problems):
        for k, v in evaluate(params, g).items():
            tot[k] = tot.get(k, 0.0) + float(v)
    if not tot:
        return {}
    return {"option_accuracy": tot["option_hits"] / max(tot["options"], 1),
            "class_accuracy": tot["class_hits"] / max(tot["classes"], 1),
            "argument_accuracy": tot["unit_hits"] / max(tot["units"], 1),
            "mesh_accuracy": tot["mesh_hits"] / max(tot["meshes"], 1),
            "seed_accuracy": tot["rank_hits"] / max(tot["ranked"], 1)}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The retraining options (shared by `python -m tag_jax.policy.train` and `tag-jax train-policy`)."""
    ap.add_argument("--problems", type=int, default=90, help="random problems to search (cached)")
    ap.add_argument("--seed-problems", type=int, default=300,
                    help="random problems, 1-32x the teacher's batch, whose hand-written seeds are "
                         "priced for the ranking head (no search; cached)")
    ap.add_argument("--seed-cache", default=None,
                    help=f"their cache (default {dataset.default_cache(dataset.SEEDS_VERSION)})")
    ap.add_argument("--budget", type=float, default=1.0,
                    help="teacher search seconds per candidate mesh of a problem")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=None, help=f"search cache (default {dataset.default_cache()})")
    ap.add_argument("--out", default=store.DEFAULT_PATH,
                    help="where the weights go (default: the package's shipped weights)")
    ap.add_argument("--max-minutes", type=float, default=7.0, help="limit on the fitting stage")


def check_arguments(args: argparse.Namespace) -> str | None:
    """What is wrong with the options, in one line, or None."""
    if args.seed_problems < 0:
        return f"--seed-problems {args.seed_problems}: must be 0 or more"
    if args.problems < 2:
        return f"--problems {args.problems}: need at least 2 (one is held out for validation)"
    if args.budget <= 0 or args.epochs < 1 or args.max_minutes <= 0:
        return "--budget, --epochs and --max-minutes must be positive"
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        return f"--out {args.out}: folder {out_dir} does not exist"
    return None


def run(args: argparse.Namespace) -> dict:
    """Search, featurise, fit and save; returns the training report."""
    t0 = time.perf_counter()
    records = dataset.generate(args.problems, args.seed, args.cache, args.budget)
    seed_records = dataset.generate_seeds(args.seed_problems, args.seed, args.seed_cache)
    problems, t1 = [], time.perf_counter()
    for i, rec in enumerate(records):
        problems.append(list(dataset.graphs_of(rec, i)))
        dataset.progress(i + 1, len(records), t1, "features")
    ranked, t1 = [], time.perf_counter()
    for i, rec in enumerate(seed_records):
        g = dataset.seed_graph(rec)
        ranked += [[g]] if g is not None else []
        dataset.progress(i + 1, len(seed_records), t1, "seed features")
    problems = [p for p in problems if p]
    n_val = max(1, len(problems) // 10)
    r_val = len(ranked) // 10
    params, report = fit(problems[:-n_val] + ranked[:len(ranked) - r_val],
                         problems[-n_val:] + ranked[len(ranked) - r_val:], args.epochs, args.seed,
                         max_minutes=args.max_minutes)
    report.update(problems=len(problems), validation_problems=n_val, seed_problems=len(ranked),
                  validation_seed_problems=r_val, epochs=args.epochs,
                  total_seconds=time.perf_counter() - t0, teacher=dataset.TEACHER_VERSION,
                  schema=features.SCHEMA_VERSION, teacher_budget_s=args.budget)
    store.save(args.out, params, CONFIG, report)
    print("wrote", args.out, {k: round(v, 3) if isinstance(v, float) else v for k, v in report.items()},
          file=sys.stderr)
    return report


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tag_jax.policy.train", description=__doc__.split("\n")[0])
    add_arguments(ap)
    args = ap.parse_args(argv)
    problem = check_arguments(args)
    if problem:
        ap.error(problem)
    run(args)


if __name__ == "__main__":
    main()
