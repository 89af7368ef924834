"""The README's "Training loop with auto_shard" runs as written and trains (8 CPU devices)."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
HEADING = "## Training loop with auto_shard"

# The README section's code, verbatim (the test below keeps the two equal once the README has it).
LOOP = '''\
import jax, jax.numpy as jnp, optax, tag_jax
from flax import linen as nn
from flax.training import train_state
from tag_jax.export import logical_axis_rules

class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="fc2")(nn.relu(nn.Dense(256, name="fc1")(x)))

def train_step(state, batch):
    def loss_fn(params):
        logits = state.apply_fn({"params": params}, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss

def batches(key, n):  # stand-in for your data loader
    for k in jax.random.split(key, n):
        x = jax.random.normal(k, (64, 128))
        yield {"x": x, "y": (x[:, 0] > 0).astype(jnp.int32)}

params = MLP().init(jax.random.key(0), jnp.zeros((1, 128)))["params"]
state = train_state.TrainState.create(apply_fn=MLP().apply, params=params, tx=optax.adamw(1e-2))
step = tag_jax.auto_shard(train_step, jax.devices(), topology=tag_jax.Topology.detect(),
                          time_budget_s=1.0, donate_argnums=(0,))  # the planner picks the mesh
losses = []
for batch in batches(jax.random.key(1), 50):
    state, loss = step(state, batch)  # plans on the first call, then runs the sharded program
    losses.append(float(loss))
plan = step.plan(state, batch)
print(plan.summary())                 # per-tensor specs, predicted compute/communication/memory
print(logical_axis_rules(plan), f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")  # rules for flax code
'''


def _readme_block():
    text = README.read_text()
    if HEADING not in text:
        return None
    m = re.search(r"```python\n(.*?)```", text[text.index(HEADING):], re.S)
    return m.group(1) if m else None


def test_readme_loop_is_the_checked_code():
    block = _readme_block()
    if block is not None:  # once the section is in the README, it must stay the code tested here
        assert block == LOOP
    code_lines = [line for line in LOOP.splitlines() if line.strip()]
    assert len(code_lines) < 30, len(code_lines)


def test_readme_loop_trains(capsys):
    import jax

    assert jax.device_count() == 8
    namespace: dict = {}
    exec(compile(LOOP, "README.md:training-loop", "exec"), namespace)
    losses = namespace["losses"]
    assert len(losses) == 50 and losses[-1] < 0.5 * losses[0]
    out = capsys.readouterr().out
    assert "state/params/fc1/kernel" in out and "predicted: step" in out
    rules = dict(namespace["logical_axis_rules"](namespace["plan"]))
    # the rules reproduce the plan's sharding of fc1's kernel
    import flax.linen as nn

    arg = {a.path: a for a in namespace["plan"].arguments}["state/params/fc1/kernel"]
    got = nn.logical_to_mesh_axes(("d128", "d256"), tuple(rules.items()))
    want = arg.sharding.to_partition_spec()
    assert tuple(got) == tuple(want) + (None,) * (2 - len(want))


NNX_HEADING = "## Training loop with Flax NNX"
NNX_LOOP = '''\
import jax, jax.numpy as jnp, optax, tag_jax
from flax import nnx

class MLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1, self.fc2 = nnx.Linear(128, 256, rngs=rngs), nnx.Linear(256, 2, rngs=rngs)
    def __call__(self, x):
        return self.fc2(nnx.relu(self.fc1(x)))

def train_step(model, optimizer, batch):  # as for nnx.jit: mutates model and optimizer
    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(batch["x"]), batch["y"]).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

model = MLP(nnx.Rngs(0))
optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
step = tag_jax.auto_shard(train_step, jax.devices(), time_budget_s=1.0)
losses = []
for k in jax.random.split(jax.random.key(1), 50):
    x = jax.random.normal(k, (64, 128))
    batch = {"x": x, "y": (x[:, 0] > 0).astype(jnp.int32)}
    losses.append(float(step(model, optimizer, batch)))  # the updates land in model, optimizer
print(step.plan(model, optimizer, batch).summary())  # the objects' state: state/0/fc1/kernel/value
print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
'''


def test_readme_nnx_loop_is_the_checked_code():
    text = README.read_text()
    assert NNX_HEADING in text
    m = re.search(r"```python\n(.*?)```", text[text.index(NNX_HEADING):], re.S)
    assert m.group(1) == NNX_LOOP


def test_readme_nnx_loop_trains_and_the_model_keeps_the_updates(capsys):
    namespace: dict = {}
    exec(compile(NNX_LOOP, "README.md:nnx-loop", "exec"), namespace)
    losses = namespace["losses"]
    assert len(losses) == 50 and losses[-1] < 0.5 * losses[0]
    assert int(namespace["optimizer"].step[...]) == 50  # the updates reached the caller's objects
    assert "state/0/fc1/kernel/value" in capsys.readouterr().out
