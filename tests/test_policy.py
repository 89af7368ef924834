"""The learned policy: joint-graph features, masked scores, weights on disk, and its plan alone."""
import os
import time

import jax
import numpy as np
import pytest

import tag_jax
from tag_jax import models
from tag_jax.policy import Policy, SchemaMismatchError, features, store
from tag_jax.policy.network import NEG, PolicyNet
from tag_jax.policy.train import CONFIG
from tag_jax.search.anneal import candidate_meshes
from tag_jax.search.planner import search

TOPO = tag_jax.Topology.preset("2x4-v100-25gbe")


@pytest.fixture(scope="module")
def mlp():
    ex = models.get("mlp", "toy", optimizer="sgd")
    return ex, tag_jax.trace(ex.step, ex.state, ex.batch)


@pytest.fixture(scope="module")
def built(mlp):
    graph = mlp[1]
    mesh = candidate_meshes(TOPO.ids, TOPO)[1]  # (data=4, model=2)
    ctx = features.context(graph, mesh)
    return graph, mesh, ctx, features.build(graph, TOPO, mesh, ctx)


@pytest.fixture(scope="module")
def policy(built):
    g = features.pad([built[3]])
    params = jax.jit(PolicyNet(**CONFIG).init)(jax.random.key(0), g)["params"]
    return Policy(params, CONFIG)


def test_features_have_one_node_per_decision_unit_op_class_and_device(built):
    graph, mesh, ctx, g = built
    G, C, D = len(ctx.groups), len(ctx.classes), mesh.size
    # mlp toy: the 2 hidden layers share a kernel group and a bias group; then the head's two.
    assert G == 4 and D == 8
    # op classes: every op with a choice, the same op of both hidden layers sharing one class
    assert C == 81 and sum(map(len, ctx.classes)) == sum(len(o) > 1 for o in ctx.op_strategies)
    assert g.n_node.tolist() == [G + 1 + C + D]
    assert g.nodes["x"].shape == (G + 1 + C + D, features.NODE_FEATURES)
    assert g.nodes["opt"].shape == (G + 1 + C + D, features.MAX_OPTIONS, features.OPTION_FEATURES)
    assert g.nodes["type"].tolist() == [0] * G + [1] + [3] * C + [2] * D
    want = ([len(u.options) for u in ctx.groups] + [len(ctx.batch_sets)]
            + [min(len(ctx.op_strategies[m[0]]), features.MAX_OPTIONS) for m in ctx.classes] + [0] * D)
    assert g.nodes["mask"].sum(1).tolist() == want
    # an op class's option 0 is full replication (the rules' convention), flagged in column 0
    assert (g.nodes["opt"][G + 1:G + 1 + C, 0, 0] == 1).all()
    assert (g.nodes["opt"][G + 1:G + 1 + C, 1:, 0] == 0).all()
    types = np.bincount(g.edges["type"], minlength=len(features.EDGE_TYPES))
    assert types[2] == D * (D - 1)  # complete device graph
    assert types[3] == types[4] == (G + 1) * D  # complete op-device bipartite graph
    assert types[0] == types[1] > 0  # op->op both ways
    assert types[5] == types[6] > 0  # class->class (tensors between classes) both ways
    assert types[7] == types[8] == C  # each class to its owning group and back
    # TAG's normalisation: op-device times are divided by the norm of all of them.
    t = g.edges["x"][g.edges["type"] == 3, 0]
    np.testing.assert_allclose(np.linalg.norm(t), 1.0, rtol=1e-5)
    # Bandwidths are relative to the fastest link: NVLink 1, 25 GbE 3.125/150.
    bw = np.unique(g.edges["x"][g.edges["type"] == 2, 0])
    np.testing.assert_allclose(bw, [3.125 / 150, 1.0], rtol=1e-5)


def test_padding_goes_to_power_of_two_buckets_and_padding_is_inert(built):
    g = built[3]
    p = features.pad([g, g])
    real_nodes, real_edges = 2 * int(g.n_node[0]), 2 * int(g.n_edge[0])
    assert (real_nodes, real_edges) == (188, 1040)
    assert p.nodes["x"].shape[0] == 256 and p.senders.shape[0] == 2048 and p.n_node.shape[0] == 4
    assert not p.nodes["mask"][real_nodes:].any()
    assert (p.senders[real_edges:] == real_nodes).all() and (p.receivers[real_edges:] == real_nodes).all()
    # Another graph of similar size lands in the same bucket: no recompilation.
    assert features.pad([g]).nodes["x"].shape == features.pad([g]).nodes["x"].shape


def _permute_devices(g, perm):
    """The same graph with its device nodes listed in another order (edges relabelled, shuffled)."""
    n = int(g.n_node[0])
    first = n - len(perm)
    new_index = np.arange(n)
    new_index[first:] = first + np.argsort(perm)
    order = np.concatenate([np.arange(first), first + np.asarray(perm)])
    nodes = {k: v[order] for k, v in g.nodes.items()}
    shuffle = np.random.default_rng(0).permutation(len(g.senders))
    return g._replace(nodes=nodes, senders=new_index[g.senders][shuffle],
                      receivers=new_index[g.receivers][shuffle],
                      edges={k: v[shuffle] for k, v in g.edges.items()})


def test_scores_do_not_depend_on_the_order_of_device_nodes_or_edges(built, policy):
    g = built[3]
    a = policy.apply(features.pad([g]))
    b = policy.apply(features.pad([_permute_devices(g, [7, 3, 5, 1, 0, 2, 6, 4])]))
    n_ops = len(built[2].groups) + 1
    np.testing.assert_allclose(a["options"][:n_ops], b["options"][:n_ops], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(a["mesh"][0], b["mesh"][0], rtol=1e-4, atol=1e-5)


def test_features_do_not_depend_on_how_the_topology_lists_its_devices(built):
    graph, mesh, ctx, g = built
    d = TOPO.to_dict()
    shuffled = tag_jax.Topology.from_json(dict(d, devices=[d["devices"][i] for i in (4, 0, 5, 1, 6, 2, 7, 3)]))
    h = features.build(graph, shuffled, mesh, ctx)
    for k in ("x", "opt", "mask"):
        np.testing.assert_allclose(g.nodes[k], h.nodes[k], rtol=1e-6)
    np.testing.assert_allclose(g.edges["x"], h.edges["x"], rtol=1e-6)


def test_scores_are_masked_to_valid_options(built, policy):
    graph, mesh, ctx, g = built
    out = policy.apply(features.pad([g]))
    valid = features.pad([g]).nodes["mask"]
    assert (out["options"][~valid] == NEG).all() and np.isfinite(out["options"][valid]).all()
    (guide,) = policy.guide(graph, TOPO, [mesh], [ctx])
    sizes = [len(u.options) for u in ctx.groups] + [len(ctx.batch_sets)]
    assert [len(p) for p in guide.prior] == sizes
    for p, n in zip(guide.prior, sizes):
        np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-9)
        assert (p > 0).all()
    assert all(0 <= k < n for k, n in zip(guide.decision, sizes))
    # op classes: a prior over each class's options, the argmax as its choice
    n_opts = [len(ctx.op_strategies[m[0]]) for m in ctx.classes]
    assert [len(p) for p in guide.op_prior] == n_opts
    assert list(guide.op_choices) == [int(np.argmax(p)) for p in guide.op_prior]
    # the policy's plan gives every member of a class the class's option, other ops option 0
    plan = guide.strategy(graph)
    for members, k in zip(ctx.classes, guide.op_choices):
        assert {plan.choices[i] for i in members} == {k}
    classed = {i for m in ctx.classes for i in m}
    assert all(plan.choices[i] == 0 for i in range(len(graph.ops)) if i not in classed)
    storage, _ = features.input_shardings(graph, ctx.groups, ctx.batch_sets, guide.decision)
    assert plan.input_shardings == storage == guide.propagated(graph).input_shardings


def test_weights_round_trip_and_a_schema_mismatch_is_refused(built, policy, tmp_path):
    path = str(tmp_path / "p.npz")
    store.save(path, policy.params, CONFIG, {"note": "test"})
    t0 = time.perf_counter()
    again = Policy.load(path)
    assert time.perf_counter() - t0 < 1.0
    assert again.meta == {"note": "test"} and again.config == CONFIG
    g = features.pad([built[3]])
    np.testing.assert_array_equal(policy.apply(g)["options"], again.apply(g)["options"])
    with np.load(path, allow_pickle=False) as z:  # no object arrays anywhere
        assert str(z["__schema__"]) == features.SCHEMA_VERSION
    store.save(path, policy.params, CONFIG, schema="tag_jax-policy-features-0")
    with pytest.raises(SchemaMismatchError, match=r"trained for feature schema "
                                                  r"'tag_jax-policy-features-0'.*retrain"):
        Policy.load(path)


@pytest.mark.skipif(not os.path.exists(store.DEFAULT_PATH), reason="no shipped weights")
def test_shipped_weights_load_fast_and_match_the_schema():
    t0 = time.perf_counter()
    p = Policy.load()
    assert time.perf_counter() - t0 < 1.0
    assert p.config == CONFIG and p.meta["problems"] > 0
    from tag_jax.policy.dataset import TEACHER_VERSION

    assert p.meta["teacher"] == TEACHER_VERSION and p.meta["schema"] == features.SCHEMA_VERSION


@pytest.mark.skipif(not os.path.exists(store.DEFAULT_PATH), reason="no shipped weights")
def test_shipped_policy_beats_data_parallel_zero_shot_on_a_held_out_case():
    from tag_jax.baselines import baseline_strategy
    from tag_jax.policy import zoo
    from tag_jax.policy.teacher import mesh_problem

    name, size, cfg = zoo.HELD_OUT_MODELS[3]  # the 6-layer mlp, a size training never draws
    ex = models.get(name, size, **cfg)
    graph = tag_jax.trace(ex.step, ex.state, ex.batch)
    topo = tag_jax.Topology.preset("tag-hetero")  # a held-out preset
    alone = search(graph, topo, list(topo.ids), time_budget_s=0, policy=Policy.load())
    ann, _ = mesh_problem(graph, topo, candidate_meshes(topo.ids, topo)[0])
    dp = ann.sim.cost(baseline_strategy("data_parallel", graph, ann.op_strategies, ann.mesh,
                                        simulator=ann.sim))
    assert alone.cost.step_time_s < dp.step_time_s


def test_guided_search_keeps_baselines_and_adds_the_policy_seeds(mlp, policy):
    graph = mlp[1]
    r = search(graph, TOPO, list(TOPO.ids), time_budget_s=3.0, policy=policy)  # (1 s: skipped under load)
    assert any(k.startswith("policy (") for k in r.seeds)  # its argument shardings, propagated
    assert any(k.startswith("policy ops (") for k in r.seeds)  # its own op options
    assert any(k.startswith("data_parallel") for k in r.seeds)
    assert r.cost.step_time_s <= min(r.seeds.values()) * (1 + 1e-9)


def test_teacher_projects_plans_onto_decision_vectors(mlp):
    from tag_jax.baselines import baseline_strategy
    from tag_jax.policy.teacher import mesh_problem, project
    from tag_jax.search.planner import replicated_strategy

    graph = mlp[1]
    mesh = candidate_meshes(TOPO.ids, TOPO)[0]  # (data=8,)
    ann, starts = mesh_problem(graph, TOPO, mesh)
    G = len(ann.groups)
    args = (graph, ann.op_strategies, ann.groups, ann.batch_sets)
    assert project(*args, replicated_strategy(graph, mesh)) == (0,) * (G + 1)
    dp = baseline_strategy("data_parallel", graph, ann.op_strategies, mesh)
    assert project(*args, dp) == (0,) * G + (len(ann.batch_sets) - 1,) == starts["data_parallel"]
    # a decision's own plan projects back onto a decision with the same argument shardings
    for d in starts.values():
        back = project(*args, ann.evaluate(d)[2])
        assert ann.shardings(back)[0] == ann.shardings(d)[0]


def test_class_labels_take_each_class_majority(built):
    from tag_jax.policy.dataset import class_labels

    graph, mesh, ctx, g = built
    choices = [0] * len(graph.ops)
    multi = next(m for m in ctx.classes if len(m) >= 2)  # the hidden layers' shared ops
    for i in multi:
        choices[i] = 2
    choices[multi[0]] = 1  # one dissenter: the majority still wins when there are 3 or more
    labels = class_labels(ctx, choices)
    k = ctx.classes.index(multi)
    assert labels[k] == (2 if len(multi) >= 3 else 1)  # (a tie goes to the lower option)
    assert all(v == 0 for j, v in enumerate(labels) if j != k)
    # labels land on the class nodes, weighted, and the teacher's decision on the group nodes
    G = len(ctx.groups)
    lg = features.build(graph, TOPO, mesh, ctx, labels=[0] * (G + 1), op_labels=labels)
    assert lg.nodes["label"][G + 1 + k] == labels[k]
    w = lg.nodes["has_label"][G + 1:G + 1 + len(ctx.classes)]
    assert (w >= 0.2 - 1e-6).all() and (w <= 1 + 1e-6).all() and w.max() == pytest.approx(1.0)
    assert (lg.nodes["has_label"][G + 1 + len(ctx.classes):] == 0).all()  # devices: no label


def test_op_annealing_follows_its_prior_and_stops_at_max_moves(built):
    from tag_jax.cost import Simulator
    from tag_jax.search.anneal import anneal_ops, op_classes
    from tag_jax.search.planner import replicated_strategy
    from tag_jax.search.propagate import carried_outputs

    graph, mesh, ctx, g = built
    sim = Simulator(graph, ctx.op_strategies, TOPO, mesh, carried=carried_outputs(graph))
    start = replicated_strategy(graph, mesh)
    classes = op_classes(graph, ctx.op_strategies)
    deadline = time.perf_counter() + 30
    s0, c0, m0 = anneal_ops(sim, start, deadline, np.random.default_rng(0), max_moves=25)
    assert m0 == 25 and c0.step_time_s <= sim.cost(start).step_time_s
    # the same generator and no prior: the same moves (a prefix of a longer run)
    s1, c1, m1 = anneal_ops(sim, start, deadline, np.random.default_rng(0), max_moves=25)
    assert s1.choices == s0.choices
    # a prior that puts all mass on option 1: every move it draws sets a class to option 1
    prior = [np.eye(len(ctx.op_strategies[m[0]]))[1] for m in classes]
    seen = []
    inc_cls = type(sim.incremental(start))
    propose = inc_cls.propose

    def spy(self, changes):
        seen.append(set(changes.values()))
        return propose(self, changes)

    inc_cls.propose = spy
    try:
        anneal_ops(sim, start, deadline, np.random.default_rng(1), prior=prior, max_moves=200)
    finally:
        inc_cls.propose = propose
    assert len(seen) == 200
    share = sum(v == {1} for v in seen) / len(seen)
    assert share > 0.7  # PRIOR_WEIGHT (0.8) of the moves, plus uniform draws that pick 1


@pytest.mark.parametrize("which", ["random", "shipped"])
def test_zero_budget_returns_the_policy_plan_and_it_computes_the_same_step(mlp, policy, which):
    if which == "shipped":
        if not os.path.exists(store.DEFAULT_PATH):
            pytest.skip("no shipped weights")
        policy = Policy.load()
    ex = mlp[0] if which == "random" else models.get("gpt2", "toy", optimizer="sgd")
    state, batch = ex.init(jax.random.key(0))
    mesh = jax.make_mesh((8,), ("devices",), axis_types=(jax.sharding.AxisType.Auto,))
    step = tag_jax.auto_shard(ex.step, mesh, topology=TOPO, time_budget_s=0, policy=policy)
    plan = step.plan(state, batch)
    # a few readings of its scores and the baselines priced (no search moves), on its top meshes
    from tag_jax.policy.guide import BASELINES_TRIED, MESHES_TRIED

    assert 1 <= plan.search.evaluations <= (4 + 2 * len(BASELINES_TRIED)) * MESHES_TRIED
    names = [f"{kind} (mesh choice {k + 1})" for k in range(MESHES_TRIED)
             for kind in ("policy", "replicated") + BASELINES_TRIED]
    assert set(plan.search.seeds) <= set(names) and "policy (mesh choice 1)" in plan.search.seeds
    assert any(plan.strategy.name.startswith(f"tag_jax ({n})") for n in names)  # (+ compression)
    assert plan.cost.step_time_s > 0
    got = step(state, batch)
    want = jax.jit(ex.step)(state, batch)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_policy_alone_is_never_slower_than_the_baselines_on_its_top_mesh(mlp, policy):
    # an untrained policy: its own readings lose to data parallel and Megatron here, so the plan
    # alone must be one of those (or better), never its readings' best
    from tag_jax.baselines import baseline_strategy
    from tag_jax.cost import Simulator
    from tag_jax.search.propagate import carried_outputs

    graph = mlp[1]
    r = search(graph, TOPO, list(TOPO.ids), time_budget_s=0, policy=policy)
    meshes = candidate_meshes(TOPO.ids, TOPO, leave_out=True)  # the planner's meshes
    guides, ranking = policy.assess(graph, TOPO, meshes)
    top = guides[ranking[0][0]]  # the mesh of the seed ranked first
    ops = top.context.op_strategies
    sim = Simulator(graph, ops, TOPO, top.mesh, carried=carried_outputs(graph))
    kinds = ("data_parallel", "fsdp") + (("megatron",) if len(top.mesh.shape) == 2 else ())
    for kind in kinds:
        base = sim.cost(baseline_strategy(kind, graph, ops, top.mesh, simulator=sim))
        assert r.cost.step_time_s <= base.step_time_s * (1 + 1e-9), kind
    # the evaluations count the baselines' pricings too: more than the 3 readings per mesh alone
    assert r.evaluations > 3 * len({k for k in r.seeds if k.startswith("policy (")})


def test_seed_candidates_are_the_searchs_seeds_replication_once_per_set_of_devices():
    mixed = tag_jax.Topology.preset("4xa100-4xv100")
    meshes = candidate_meshes(mixed.ids, mixed, leave_out=True)
    cands = features.seed_candidates(meshes)
    assert len(set(cands)) == len(cands)
    for k, m in enumerate(meshes):
        kinds = {kind for j, kind in cands if j == k}
        assert kinds - {"replicated"} == ({"megatron"} if len(m.shape) == 2 else {"data_parallel", "fsdp"})
    sets = {frozenset(m.device_ids) for m in meshes}
    replicated = [frozenset(meshes[k].device_ids) for k, kind in cands if kind == "replicated"]
    assert len(sets) == 2 and sorted(map(len, replicated)) == [4, 8] and set(replicated) == sets


def test_candidate_rows_describe_each_seeds_kind_memory_and_traffic(mlp):
    graph = mlp[1]
    meshes = candidate_meshes(TOPO.ids, TOPO)
    cands = features.seed_candidates(meshes)
    rows = features.candidate_rows(graph, TOPO, meshes, cands)
    assert rows.shape == (len(cands), features.CANDIDATE_FEATURES) and np.isfinite(rows).all()
    row = {c: r for c, r in zip(cands, rows)}
    kind_cols = slice(7, 7 + len(features.RANK_KINDS))
    for (k, kind), r in row.items():
        assert r[kind_cols].tolist() == [float(kind == x) for x in features.RANK_KINDS]
    dp, fsdp, rep = row[(0, "data_parallel")], row[(0, "fsdp")], row[(0, "replicated")]
    mem, sync = 7 + len(features.RANK_KINDS), 8 + len(features.RANK_KINDS)
    assert fsdp[mem] < dp[mem] == rep[mem]  # FSDP keeps 1/8 of the state
    assert rep[sync] < dp[sync]  # replication moves nothing
    # Megatron on (data=2, model=4): its data axis crosses the 25 GbE link as the 8-device ring
    # does, but all-reduces only the model-split quarter of the gradients, between two devices
    assert meshes[2].shape == (2, 4) and row[(2, "megatron")][sync] < dp[sync]


def test_seed_times_price_the_seeds_as_the_search_does(mlp):
    from tag_jax.policy.teacher import seed_times
    from tag_jax.search.planner import _mesh_label

    graph = mlp[1]
    meshes = candidate_meshes(TOPO.ids, TOPO)
    cands = features.seed_candidates(meshes)
    times = seed_times(graph, TOPO, meshes, cands, None)
    r = search(graph, TOPO, list(TOPO.ids), time_budget_s=2.0, permute=False)
    for (k, kind), t in zip(cands, times):
        name = f"{kind} {_mesh_label(meshes[k])}"
        if name in r.seeds:
            assert t == pytest.approx(r.seeds[name], rel=1e-9), name
    assert sum(f"{kind} {_mesh_label(meshes[k])}" in r.seeds for k, kind in cands) >= 4
    assert seed_times(graph, TOPO, meshes, cands[:1], 1.0) == [float("inf")]  # 1 byte fits nothing


def test_assess_ranks_every_seed_once_best_first(mlp, policy):
    graph = mlp[1]
    meshes = candidate_meshes(TOPO.ids, TOPO)
    guides, ranking = policy.assess(graph, TOPO, meshes)
    assert len(guides) == len(meshes)
    assert sorted((k, kind) for k, kind, _ in ranking) == sorted(features.seed_candidates(meshes))
    scores = [s for _, _, s in ranking]
    assert scores == sorted(scores, reverse=True) and all(s > NEG / 2 for s in scores)
