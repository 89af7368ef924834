"""The policy network (flax + jraph): typed-edge graph attention, then option, mesh and value heads.

Layers follow TAG: each edge type has its own attention heads (keys, queries and values offset by
a projection of the edge's features and type); a node attends separately over its incoming edges
of each type (softmax per receiver and type), the per-type results are joined, projected and added
back (residual, layer norm). Heads:

- options: every parameter-group, batch and op-class node scores each of its candidate options
  from [node embedding, option features, the graph's mean device embedding, mesh globals]; invalid
  (padding) options get -1e9;
- mesh: one logit per graph (a graph is one candidate mesh of a problem), from pooled embeddings;
- value: log(best step time / data-parallel step time) on that mesh;
- rank: one score per seed (a baseline kind on one of the problem's meshes, `features.
  candidate_rows`) from the graph's pooled embedding and the seed's row: which seed to price first.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph

from tag_jax.policy import features as F

NEG = -1e9


def _segment_mean(x, seg, weight, n):
    s = jax.ops.segment_sum(x * weight[:, None], seg, n)
    c = jax.ops.segment_sum(weight, seg, n)
    return s / jnp.maximum(c, 1.0)[:, None]


class TypedAttention(nn.Module):
    hidden: int
    heads: int

    @nn.compact
    def __call__(self, h, e, senders, receivers, etype):
        T, H, K = len(F.EDGE_TYPES), self.hidden, self.heads
        N, E = h.shape[0], senders.shape[0]
        # Queries, keys and values are projected once per node; each edge adds a projection of its
        # own features (its type one-hot included) to its key and value, so each type has its own
        # offset at the cost of one shared projection.
        q = nn.Dense(H, name="query")(h).reshape(N, K, H // K)
        kv = nn.Dense(2 * H, name="key_value")(h).reshape(N, 2, K, H // K)
        kv = kv[senders] + nn.Dense(2 * H, name="key_value_edge")(e).reshape(E, 2, K, H // K)
        qe = q[receivers] + nn.Dense(H, name="query_edge")(e).reshape(E, K, H // K)
        logits = (qe * kv[:, 0]).sum(-1) / jnp.sqrt(H // K)          # [E, K]
        seg = receivers * T + etype  # a softmax per receiver and edge type
        w = jraph.segment_softmax(logits, seg, N * T)
        agg = jax.ops.segment_sum(w[..., None] * kv[:, 1], seg, N * T)  # [N*T, K, d]
        out = nn.Dense(H, name="out")(agg.reshape(N, T * H))
        return nn.LayerNorm()(h + nn.gelu(out))


class PolicyNet(nn.Module):
    hidden: int = 64
    layers: int = 3
    heads: int = 4

    @nn.compact
    def __call__(self, g: jraph.GraphsTuple):
        H = self.hidden
        nodes, edges = g.nodes, g.edges
        N = nodes["x"].shape[0]
        G = g.n_node.shape[0]
        ntype = jax.nn.one_hot(nodes["type"], 4)
        h = nn.gelu(nn.Dense(H, name="embed_node")(jnp.concatenate([nodes["x"], ntype], -1)))
        e = jnp.concatenate([edges["x"], jax.nn.one_hot(edges["type"], len(F.EDGE_TYPES))], -1)
        for i in range(self.layers):
            h = TypedAttention(H, self.heads, name=f"attention_{i}")(
                h, e, g.senders, g.receivers, edges["type"])
        graph_of = jnp.repeat(jnp.arange(G), g.n_node, total_repeat_length=N)
        is_dev = (nodes["type"] == F.DEVICE).astype(h.dtype)
        is_op = 1.0 - is_dev
        dev = _segment_mean(h, graph_of, is_dev, G)
        ops = _segment_mean(h, graph_of, is_op, G)
        glob = nn.gelu(nn.Dense(H, name="embed_globals")(g.globals["x"]))
        context = jnp.concatenate([dev, glob], -1)[graph_of]  # [N, 2H]
        # Per-option work is N x K rows: keep it narrow (H/2); a dense layer over [option, node,
        # context] is split so the node part is computed once per node.
        o = nn.gelu(nn.Dense(H // 2, name="embed_option")(nodes["opt"]))  # [N, K, H/2]
        own = nn.Dense(H // 2, name="option_context")(jnp.concatenate([h, context], -1))[:, None]
        z = nn.gelu(nn.Dense(H // 2, name="option_hidden")(o) + own)
        scores = nn.Dense(1, name="option_score")(z)[..., 0]
        scores = jnp.where(nodes["mask"], scores, NEG)
        pooled = jnp.concatenate([ops, dev, glob], -1)
        mesh = nn.Dense(1, name="mesh_score")(nn.gelu(nn.Dense(H, name="mesh_hidden")(pooled)))[:, 0]
        value = nn.Dense(1, name="value")(nn.gelu(nn.Dense(H, name="value_hidden")(pooled)))[:, 0]
        # Seeds: every (mesh, baseline kind) of the problem, scored from this graph's pooled
        # embedding and the seed's own row, so that one graph ranks the seeds of all meshes.
        cand = g.globals["cand"]  # [G, C, F]
        C = cand.shape[1]
        pooled_c = nn.Dense(H, name="rank_pooled")(pooled)[:, None]  # [G, 1, H]
        r = nn.gelu(nn.Dense(H, name="rank_seed")(cand) + pooled_c)
        r = nn.gelu(nn.Dense(H // 2, name="rank_hidden")(r))
        rank = nn.Dense(1, name="rank_score")(r)[..., 0]
        rank = jnp.where(g.globals["cand_mask"], rank, NEG).reshape(G, C)
        return {"options": scores, "mesh": mesh, "value": value, "rank": rank}
