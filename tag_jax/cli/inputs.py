"""What the commands share: the workload (zoo model or user function), the topology and the mesh.

Every check here fails with a `CLIError` whose message names the flag, the value and what to do.
JAX's devices are looked at only in `target`, after `main` has asked for simulated ones.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import os
import sys
from typing import Any, Callable

DEFAULT_TOPOLOGY = "2x4-v100-25gbe"


class CLIError(Exception):
    """Bad input: printed as one line, exit with `status`."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


def one_line(message: str) -> str:
    """A multi-line message as one line (errors are one line on stderr)."""
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


@dataclasses.dataclass(frozen=True)
class Workload:
    """A function to plan and its example arguments (abstract ShapeDtypeStructs are fine)."""

    fn: Callable
    args: tuple
    name: str
    description: str


@dataclasses.dataclass(frozen=True)
class Target:
    """Where to plan: the topology, the JAX devices standing for its ids, an optional mesh."""

    topology: Any
    devices: tuple
    mesh: Any  # jax.sharding.Mesh, or None: the planner chooses the shape

    def for_planner(self) -> Any:
        """What auto_shard takes: the fixed mesh, or the devices to choose a mesh over."""
        return self.devices if self.mesh is None else self.mesh

    def for_baselines(self) -> Any:
        """Baselines need a mesh: the fixed one, or all devices on one axis."""
        if self.mesh is not None:
            return self.mesh
        import numpy as np
        from jax.sharding import AxisType, Mesh

        return Mesh(np.array(self.devices, dtype=object), ("data",), axis_types=(AxisType.Auto,))


# ---- arguments -----------------------------------------------------------------------------------

def add_workload_arguments(p: argparse.ArgumentParser) -> None:
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="zoo model name (listed below)")
    what.add_argument("--function", metavar="MODULE:FUNCTION",
                      help="your own step function, e.g. mypkg.train:train_step (needs --args)")
    p.add_argument("--size", default="toy", help="zoo model size (default: toy)")
    p.add_argument("--args", metavar="MODULE:FACTORY", dest="factory",
                   help="with --function: a function of no arguments returning the example "
                        "arguments as a tuple (one per positional argument; "
                        "jax.ShapeDtypeStruct leaves are enough)")


def add_target_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--topology", default=DEFAULT_TOPOLOGY, metavar="PRESET|FILE.json",
                   help=f"cluster: a preset name or a JSON file (default: {DEFAULT_TOPOLOGY}; "
                        "'tag-jax topology' lists the presets)")
    p.add_argument("--mesh-shape", metavar="N,M", type=str,
                   help="fix the mesh shape, e.g. 4,2; its sizes must multiply to the topology's "
                        "device count (default: the planner chooses)")
    p.add_argument("--axis-names", metavar="A,B",
                   help="names of the mesh axes (default: data / data,model / axis0,axis1,...)")
    p.add_argument("--budget", type=_at_least(float, 0), default=7.0, metavar="SECONDS",
                   help="search time budget in seconds (default: 7)")
    p.add_argument("--seed", type=int, default=0, help="search seed (default: 0)")
    p.add_argument("--devices", type=_at_least(int, 1), default=8, metavar="N",
                   help="simulated CPU devices to start, unless XLA_FLAGS already sets a count "
                        "(default: 8)")
    p.add_argument("-q", "--quiet", action="store_true", help="no search progress on stderr")


def _at_least(kind: type, low: float) -> Callable[[str], Any]:
    """An argparse type: a number of `kind`, no less than `low`."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            what = "whole number" if kind is int else "number"
            raise argparse.ArgumentTypeError(f"expected a {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected at least {low}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def models_epilog() -> str:
    from tag_jax import models

    rows = [f"  {n:<12} {', '.join(models.sizes(n))}" for n in models.names()]
    return "zoo models and their sizes:\n" + "\n".join(rows)


# ---- loading -------------------------------------------------------------------------------------

def workload(args: argparse.Namespace) -> Workload:
    if args.model is not None:
        if args.factory is not None:
            raise CLIError("--args goes with --function, not with --model (zoo models bring "
                           "their own example arguments)")
        from tag_jax import models

        try:
            ex = models.get(args.model, args.size)
        except KeyError as exc:
            raise CLIError(f"{exc.args[0]} ('tag-jax plan --help' lists models and sizes)") from None
        return Workload(ex.step, (ex.state, ex.batch), f"{args.model}-{args.size}", ex.description)
    if args.factory is None:
        raise CLIError(f"--function {args.function} needs --args MODULE:FACTORY, a function "
                       "returning its example arguments")
    fn = import_object(args.function, "--function")
    factory = import_object(args.factory, "--args")
    example = factory()
    example = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    name = getattr(fn, "__name__", args.function)
    return Workload(fn, example, name, f"{args.function} on the arguments of {args.factory}")


def import_object(spec: str, flag: str) -> Callable:
    """`package.module:name` (a dotted name after the colon reaches into objects)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CLIError(f"{flag} {spec!r}: expected MODULE:NAME, like mypkg.train:train_step")
    # Modules in the working directory import, as with `python -m`; sys.path is restored after.
    path = list(sys.path)
    sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except Exception as exc:  # the module's own code may raise anything while importing
        raise CLIError(f"{flag} {spec!r}: cannot import module {module_name!r} "
                       f"({type(exc).__name__}: {one_line(str(exc))})") from None
    finally:
        sys.path[:] = path
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CLIError(f"{flag} {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CLIError(f"{flag} {spec!r}: {attr!r} is a {type(obj).__name__}, not a function")
    return obj


def load_topology(source: str):
    """A preset by name, else a JSON file (TopologyError names the bad field)."""
    from tag_jax.topology import Topology

    if source in Topology.presets():
        return Topology.preset(source)
    if source.endswith(".json") or os.path.exists(source) or os.sep in source:
        return Topology.from_json(source)
    raise CLIError(f"unknown topology {source!r}: not a preset ({', '.join(Topology.presets())}) "
                   "and not a JSON file")


def parse_mesh_shape(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise CLIError(f"--mesh-shape {text!r}: expected positive whole numbers separated by "
                       "commas, like 8 or 4,2")
    return tuple(int(p) for p in parts)


def axis_names(text: str | None, ndim: int) -> tuple[str, ...]:
    if text is None:
        return ("data", "model")[:ndim] if ndim <= 2 else tuple(f"axis{i}" for i in range(ndim))
    names = tuple(n.strip() for n in text.split(","))
    if len(names) != ndim or not all(n.isidentifier() for n in names) or len(set(names)) != ndim:
        raise CLIError(f"--axis-names {text!r}: expected {ndim} distinct names (one per mesh "
                       f"dimension), like {','.join(axis_names(None, ndim))}")
    return names


def target(args: argparse.Namespace) -> Target:
    topo = load_topology(args.topology)
    n = topo.num_devices
    shape = None
    if args.mesh_shape is not None:
        shape = parse_mesh_shape(args.mesh_shape)
        names = axis_names(args.axis_names, len(shape))
        size = math.prod(shape)
        if size > n:
            raise CLIError(f"--mesh-shape {args.mesh_shape}: a mesh of {size} devices is larger "
                           f"than topology '{topo.name}' ({n} devices)")
        if size != n:
            raise CLIError(f"--mesh-shape {args.mesh_shape}: {size} devices, but the plan is for "
                           f"the {n} devices of topology '{topo.name}'; give sizes that multiply "
                           f"to {n}")
    elif args.axis_names is not None:
        raise CLIError("--axis-names needs --mesh-shape (the planner names its own axes)")
    import jax

    have = jax.device_count()
    if have < n:
        raise CLIError(f"topology '{topo.name}' describes {n} devices but JAX has {have}; pass "
                       f"--devices {n} (has no effect when XLA_FLAGS already sets a device count)")
    devices = tuple(jax.devices()[:n])
    mesh = None
    if shape is not None:
        import numpy as np
        from jax.sharding import AxisType, Mesh

        grid = np.array(devices, dtype=object).reshape(shape)
        mesh = Mesh(grid, names, axis_types=(AxisType.Auto,) * len(shape))
    return Target(topo, devices, mesh)
