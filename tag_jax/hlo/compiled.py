"""Reading compiled HLO: the collectives a program really runs, its FLOPs and its memory.

Every prediction of the planner is checked against this module, so it reads the text XLA prints
after optimisation (``jax.jit(f).lower(...).compile().as_text()``), not the StableHLO JAX emits.

Device ids in ``Collective.groups`` are the ids the HLO uses. For SPMD programs (one replica, the
usual case) these are partition ids, i.e. positions in the device assignment: id ``i`` is
``mesh.devices.flat[i]`` of the mesh the program was compiled for, whatever the physical device ids
are. Pass ``device_ids=[d.id for d in mesh.devices.flat]`` to get physical ids instead.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, NamedTuple, Sequence

import numpy as np

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
REDUCE_SCATTER_REWRITE = "all-reduce+dynamic-slice"

_BITS = {"pred": 8, "s2": 2, "u2": 2, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16,
         "f16": 16, "bf16": 16, "s32": 32, "u32": 32, "f32": 32, "s64": 64, "u64": 64, "f64": 64,
         "c64": 64, "c128": 128, "token": 0}
# keep every element, move no data between devices; a convert too (XLA:CPU all-reduces a bf16 sum
# in float32 and converts it back before slicing it: still its reduce-scatter)
_PASS_THROUGH = ("bitcast", "reshape", "copy", "transpose", "convert")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of a compiled module, as seen by one device.

    ``bytes`` is the size of its per-device result (a tuple result is summed; an async
    ``*-start``/``*-done`` pair is one collective, named after its start). ``shape`` is the result's
    dims, or a tuple of dims for a tuple result; ``dtype`` the element type (comma-joined when a tuple
    mixes types). ``groups`` are the device groups (pairs ``(source, target)`` for a
    collective-permute). ``trip_count`` is how many times it runs per call of the module: the product of
    the known trip counts of the while loops around it (an unknown trip count counts 1). ``bytes`` is
    never multiplied by it; :func:`collective_bytes_by_kind` does.
    """

    kind: str
    bytes: int
    dtype: str
    shape: tuple
    groups: tuple[tuple[int, ...], ...]
    name: str
    computation: str
    fused_from: str | None = None
    trip_count: int = 1


class _Instr(NamedTuple):
    name: str
    shape: str  # result shape text, e.g. "f32[8,4]{1,0}" or "(f32[2]{0}, s32[])"
    opcode: str
    operands: tuple[str, ...]
    attrs: str  # everything after the operand list


class _Comp(NamedTuple):
    name: str
    instrs: dict[str, _Instr]
    users: dict[str, list[tuple[_Instr, int]]]  # value name -> (user, operand index)
    root: list  # [name of the ROOT instruction]


# ----------------------------------------------------------------------------- text → module


def _group(text: str, start: int) -> tuple[int, list[int]]:
    """End (past the closing bracket) of the bracket group opening at ``text[start]``; its top-level commas."""
    depth, commas = 0, []
    for i in range(start, len(text)):
        depth += (text[i] in "([{") - (text[i] in ")]}")
        if depth == 0:
            return i + 1, commas
        commas += [i] if depth == 1 and text[i] == "," else []
    raise ValueError(f"unbalanced brackets in HLO line: {text!r}")


def _parse_instr(line: str) -> _Instr | None:
    m = re.match(r"\s*(?:ROOT\s+)?%?([^\s=]+) = (.*)$", line)
    if not m:
        return None
    name, rest = m.group(1), m.group(2)
    end = _group(rest, 0)[0] if rest.startswith("(") else rest.find(" ")
    m = re.match(r"([\w\-]+)\(", rest[end:].lstrip()) if end > 0 else None
    if not m:
        return None
    shape, rest = rest[:end], rest[end:].lstrip()
    close, commas = _group(rest, m.end() - 1)
    cuts = [m.end() - 1] + commas + [close - 1]  # operands may be typed ("f32[2,3]{1,0} %x") in old HLO
    parts = [rest[i + 1:j].split() for i, j in zip(cuts, cuts[1:])]
    return _Instr(name, shape, m.group(1), tuple(p[-1].lstrip("%") for p in parts if p), rest[close:])


def _parse_module(text: str) -> tuple[dict[str, _Comp], str | None]:
    comps: dict[str, _Comp] = {}
    entry, cur = None, None
    for raw in text.splitlines():
        line = re.sub(r"/\*.*?\*/", "", raw)
        head = re.match(r"(ENTRY\s+)?%?([^\s(]+)\s*\(.*->.*\{\s*$", line)
        if cur is None and head and not line.startswith(" "):
            cur = _Comp(head.group(2), {}, {}, [None])
            comps[cur.name] = cur
            entry = cur.name if head.group(1) else entry
        elif cur is not None and line.startswith("}"):
            cur = None
        elif cur is not None and (ins := _parse_instr(line)):
            cur.instrs[ins.name] = ins
            if line.lstrip().startswith("ROOT"):
                cur.root[0] = ins.name
            for i, op in enumerate(ins.operands):
                cur.users.setdefault(op, []).append((ins, i))
    return comps, entry


def _bits(dtype: str) -> int | None:
    m = re.fullmatch(r"f(\d+)e\d+m\d+\w*", dtype)  # f8e4m3fn, f4e2m1fn, ...
    return _BITS.get(dtype, int(m.group(1)) if m else None)


def _arrays(shape: str, where: str) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for dtype, dims in re.findall(r"([a-z][a-z0-9]*)\[([^\]]*)\]", shape):
        if _bits(dtype) is None:
            raise ValueError(f"unknown element type {dtype!r} in {where}")
        out.append((dtype, tuple(int(d.lstrip("<=")) for d in dims.split(",") if d)))
    return out


def _nbytes(dtype: str, dims: tuple[int, ...]) -> int:
    return math.ceil(math.prod(dims) * _bits(dtype) / 8)


# ----------------------------------------------------------------------------- replica groups


def _tile_ids(text: str, count: int, where: str) -> np.ndarray:
    """Device ids printed as an iota tile ``[2,4]T(1,0)`` / ``[8]``, or as a plain list of ints."""
    m = re.fullmatch(r"\s*\[([\d,]+)\](?:T\(([\d,]+)\))?\s*", text)
    if m:
        dims = [int(d) for d in m.group(1).split(",")]
        perm = [int(p) for p in m.group(2).split(",")] if m.group(2) else list(range(len(dims)))
        ids = np.arange(math.prod(dims)).reshape(dims).transpose(perm).ravel()
    else:
        ids = np.array([int(t) for t in re.findall(r"\d+", text)])
    if ids.size != count:
        raise ValueError(f"device ids {text!r} give {ids.size} ids, expected {count}, in {where}")
    return ids


def _mesh_groups(axes_text: str, ids_text: str | None, group_text: str, where: str) -> np.ndarray:
    """Groups of ``mesh['a'=4,'b'=2], device_ids=(...) {'a', 'b':(1)2}``: vary the named (sub-)axes."""
    axes = re.findall(r"'?([^',=]+)'?=(\d+)", axes_text)
    names = [a for a, _ in axes]
    sizes = [int(s) for _, s in axes]
    ids = (_tile_ids(ids_text, math.prod(sizes), where) if ids_text
           else np.arange(math.prod(sizes))).reshape(sizes)
    refs = []  # (mesh dim, pre_size, size) per grouped (sub-)axis, in printed order
    for item in filter(None, (t.strip() for t in group_text.split(","))):
        m = re.fullmatch(r"'?([^':]+)'?(?::\((\d+)\)(\d+))?", item)
        if not m:
            raise ValueError(f"cannot parse replica-group axis {item!r} in {where}")
        name, pre, size = m.groups()
        if name not in names:
            raise ValueError(f"replica-group axis {name!r} not in mesh {names} in {where}")
        d = names.index(name)
        refs.append((d, int(pre), int(size)) if pre else (d, 1, sizes[d]))
    dims, grouped = [], [0] * len(refs)
    for d, n in enumerate(sizes):
        covered, mine = 1, [k for k, r in enumerate(refs) if r[0] == d]
        if not mine:
            dims.append(n)
            continue
        for k in sorted(mine, key=lambda k: refs[k][1]):
            _, pre, size = refs[k]
            if pre % covered:
                raise ValueError(f"overlapping sub-axes of {names[d]!r} in {where}")
            if pre > covered:
                dims.append(pre // covered)
            grouped[k] = len(dims)
            dims.append(size)
            covered = pre * size
        if n % covered:
            raise ValueError(f"sub-axes of {names[d]!r} do not divide its size {n} in {where}")
        if covered < n:
            dims.append(n // covered)
    rest = [i for i in range(len(dims)) if i not in grouped]
    size = math.prod(dims[i] for i in grouped)
    return ids.reshape(dims).transpose(rest + grouped).reshape(-1, size)


def _groups(ins: _Instr, where: str, num_devices: int | None) -> tuple[tuple[int, ...], ...]:
    a = ins.attrs
    if m := re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", a):
        return tuple(tuple(int(v) for v in p.split(",")) for p in re.findall(r"\{(\d+,\d+)\}", m.group(1)))
    if m := re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\((.*?)\))? \{([^}]*)\}", a):
        return tuple(tuple(int(v) for v in g) for g in _mesh_groups(m.group(1), m.group(2), m.group(3), where))
    if m := re.search(r"replica_groups=\[(\d+),(\d+)\]<=(\[[\d,]+\](?:T\([\d,]+\))?)", a):
        n, k = int(m.group(1)), int(m.group(2))
        return tuple(tuple(int(v) for v in g) for g in _tile_ids(m.group(3), n * k, where).reshape(n, k))
    if m := re.search(r"replica_groups=\{((?:\{[\d,]*\},?)+)\}", a):
        return tuple(tuple(int(v) for v in g.split(",") if v) for g in re.findall(r"\{([\d,]*)\}", m.group(1)))
    if re.search(r"replica_groups=\{\}", a) or "replica_groups=" not in a:
        if num_devices is None:
            raise ValueError(f"{where} has replica_groups={{}} (all devices) but the device count is unknown: "
                             "the module header has no num_partitions; pass num_devices=")
        return (tuple(range(num_devices)),)
    text = a[a.index("replica_groups="):][:200]
    raise ValueError(f"cannot parse the replica groups of {where}: {text!r}")


# ----------------------------------------------------------------------------- reduce-scatter rewrite


def _called(ins: _Instr) -> list[str]:
    names = re.findall(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)",
                       ins.attrs)
    for group in re.findall(r"branch_computations=\{([^}]*)\}", ins.attrs):
        names += [n.strip().lstrip("%") for n in group.split(",")]
    return names


def _depends_on_device(comp: _Comp, name: str, stack: tuple) -> bool:
    """Whether value ``name`` is computed from partition-id/replica-id (following fusion parameters out)."""
    seen, todo = set(), [(comp, name, stack)]
    while todo:
        c, n, s = todo.pop()
        if (c.name, n) in seen or n not in c.instrs:
            continue
        seen.add((c.name, n))
        ins = c.instrs[n]
        if ins.opcode in ("partition-id", "replica-id"):
            return True
        if ins.opcode == "parameter" and s:
            caller, call = s[-1]
            todo.append((caller, call.operands[int(ins.operands[0])], s[:-1]))
        todo += [(c, op, s) for op in ins.operands]
    return False


def _slice_uses(comps, comp: _Comp, name: str, shape: tuple, n: int, stack=()) -> list | None:
    """Result shapes of the dynamic-slices that every use of ``name`` ends in, each 1/n of it along one dim.

    ``None`` when some use is anything else (or ``name`` is the ROOT of the entry computation, or
    unused). The ROOT of a fusion entered on the way (``stack``) continues as the fusion's result
    (XLA:CPU wraps the float32 -> bf16 convert after a bf16 sum's all-reduce in a fusion of its own).
    """
    uses = comp.users.get(name, [])
    if comp.root[0] == name:
        if not stack:
            return None
        caller, call = stack[-1]
        return _slice_uses(comps, caller, call.name, _arrays(call.shape, call.name)[0][1], n, stack[:-1])
    if not uses:
        return None
    found = []
    for user, idx in uses:
        if user.opcode == "dynamic-slice" and idx == 0:
            out = _arrays(user.shape, user.name)[0][1]
            diff = [(a, b) for a, b in zip(shape, out) if a != b]
            if len(out) != len(shape) or len(diff) != 1 or diff[0][0] != n * diff[0][1]:
                return None
            if not any(_depends_on_device(comp, off, stack) for off in user.operands[1:]):
                return None
            found.append(out)
            continue
        if user.opcode in _PASS_THROUGH:
            sub = _slice_uses(comps, comp, user.name, _arrays(user.shape, user.name)[0][1], n, stack)
        elif user.opcode == "fusion" and _called(user):
            callee = comps[_called(user)[0]]
            param = next((i for i in callee.instrs.values()
                          if i.opcode == "parameter" and i.operands == (str(idx),)), None)
            sub = param and _slice_uses(comps, callee, param.name, shape, n, stack + ((comp, user),))
        else:
            sub = None
        if not sub:
            return None
        found += sub
    return found


# ----------------------------------------------------------------------------- collectives


def _trip_counts(comps: dict[str, _Comp], entry: str | None) -> dict[str, int]:
    """How many times each computation runs per module call (known while trip counts, else 1)."""
    callers: dict[str, list[tuple[str, int]]] = {}
    for c in comps.values():
        for ins in c.instrs.values():
            m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', ins.attrs)
            body = re.search(r"\bbody=%?([\w.\-]+)", ins.attrs)
            for callee in _called(ins):
                trips = int(m.group(1)) if (m and ins.opcode == "while" and body and body.group(1) == callee) else 1
                callers.setdefault(callee, []).append((c.name, trips))
    memo: dict[str, int] = {}

    def count(name: str) -> int:
        if name not in memo:
            memo[name] = 1 if (name == entry or entry is None or name not in callers) else \
                sum(count(p) * t for p, t in callers[name])
        return memo[name]

    return {name: count(name) for name in comps}


def collectives(compiled_or_text: Any, *, num_devices: int | None = None,
                device_ids: Sequence[int] | None = None) -> tuple[Collective, ...]:
    """The collectives of a compiled module, in the order the HLO text lists them.

    ``compiled_or_text`` is a ``jax.stages.Compiled`` (its ``as_text()`` is read) or optimised HLO text.
    Replica groups are read in every form XLA prints: explicit ``{{0,4},{1,5}}``; empty ``{}`` (all
    devices: ``num_devices``, else ``num_partitions`` x ``replica_count`` of the module header); iota
    ``[4,2]<=[2,4]T(1,0)``; mesh ``mesh['a'=4,'b'=2], device_ids=([2,4]T(1,0)) {'a'}`` (sub-axes
    ``'a':(2)2`` included); and ``source_target_pairs`` of a collective-permute. ``device_ids`` maps the
    HLO's ids to other ids (e.g. physical device ids, see the module docstring).

    XLA:CPU has no reduce-scatter of its own after SPMD partitioning: it writes an all-reduce whose
    result every device then slices. An all-reduce result (or one element of a tuple all-reduce, via
    get-tuple-element) is reported as kind ``"reduce-scatter"`` with ``bytes`` = the slice size and
    ``fused_from="all-reduce+dynamic-slice"`` when ALL its uses, followed through bitcast / reshape /
    copy / transpose / convert and into the parameters of fusions, end as operand 0 of a ``dynamic-slice`` whose
    result has the operand's shape except one dim divided by the group size n, and whose offsets are
    computed from ``partition-id``/``replica-id``. A value that is also used whole (or is a
    computation's ROOT) stays an all-reduce. The elements of a tuple all-reduce that match become one
    reduce-scatter collective and the others one all-reduce, both named after the instruction.
    Only the five kinds of :data:`KINDS` are reported.
    """
    text = compiled_or_text if isinstance(compiled_or_text, str) else compiled_or_text.as_text()
    if "HloModule" not in text and re.search(r"^\s*(module|func\.func) ", text, re.M):
        raise ValueError("this is StableHLO/MLIR text, not compiled HLO: pass jax.jit(f).lower(...).compile()")
    comps, entry = _parse_module(text)
    if num_devices is None and (m := re.search(r"\bnum_partitions=(\d+)", text)):
        r = re.search(r"\breplica_count=(\d+)", text)
        num_devices = int(m.group(1)) * (int(r.group(1)) if r else 1)
    trips = _trip_counts(comps, entry)
    out = []
    for comp in comps.values():
        for ins in comp.instrs.values():
            kind = ins.opcode[:-5] if ins.opcode.endswith("-done") else ins.opcode
            if kind not in KINDS:
                continue
            attr = comp.instrs.get(ins.operands[0]) if ins.opcode.endswith("-done") else ins
            if attr is None:
                raise ValueError(f"{ins.opcode} {ins.name!r} in {comp.name!r}: its start is not in the computation")
            where = f"{attr.opcode} {attr.name!r} in computation {comp.name!r}"
            groups = _groups(attr, where, num_devices)
            if device_ids is not None:
                if max((max(g) for g in groups if g), default=-1) >= len(device_ids):
                    raise ValueError(f"{where}: group ids {groups} exceed the {len(device_ids)} device_ids given")
                groups = tuple(tuple(int(device_ids[i]) for i in g) for g in groups)
            arrays = _arrays(ins.shape, where)
            n = len(groups[0]) if groups else 1
            sliced = _scattered_elements(comps, comp, ins, arrays, n) if kind == "all-reduce" else {}
            for rs in (False, True):
                idx = [i for i in range(len(arrays)) if (i in sliced) == rs]
                if not idx:
                    continue
                shapes = tuple(sliced[i] if rs else arrays[i][1] for i in idx)
                out.append(Collective(
                    kind="reduce-scatter" if rs else kind,
                    bytes=sum(_nbytes(arrays[i][0], s) for i, s in zip(idx, shapes)),
                    dtype=",".join(dict.fromkeys(arrays[i][0] for i in idx)),
                    shape=shapes if ins.shape.startswith("(") else shapes[0],
                    groups=groups, name=attr.name, computation=comp.name,
                    fused_from=REDUCE_SCATTER_REWRITE if rs else None,
                    trip_count=trips.get(comp.name, 1)))
    return tuple(out)


def _scattered_elements(comps, comp: _Comp, ins: _Instr, arrays: list, n: int) -> dict[int, tuple]:
    """{result element index: per-device slice shape} for the all-reduce results only ever sliced 1/n."""
    if n <= 1:
        return {}
    if not ins.shape.startswith("("):
        shapes = _slice_uses(comps, comp, ins.name, arrays[0][1], n)
        return {0: shapes[0]} if shapes else {}
    uses = comp.users.get(ins.name, [])
    if not uses or any(u.opcode != "get-tuple-element" for u, _ in uses):
        return {}
    by_index: dict[int, list] = {}
    for u, _ in uses:
        by_index.setdefault(int(re.search(r"index=(\d+)", u.attrs).group(1)), []).append(u)
    out = {}
    for i, gtes in by_index.items():
        shapes = [_slice_uses(comps, comp, g.name, arrays[i][1], n) for g in gtes]
        if all(shapes):
            out[i] = shapes[0][0]
    return out


def collective_bytes_by_kind(colls: Sequence[Collective]) -> dict[str, int]:
    """Per-device bytes per kind, each collective counted ``trip_count`` times (every kind present, 0 if none)."""
    out = {k: 0 for k in KINDS}
    for c in colls:
        out[c.kind] += c.bytes * c.trip_count
    return out


# ----------------------------------------------------------------------------- cost and memory


def compiled_flops(compiled: Any) -> float:
    """FLOPs XLA's cost analysis counts for ``compiled``.

    The number is per device (one SPMD partition), per module call, and ignores loop trip counts: the
    body of a ``while`` (``lax.scan``, ``fori_loop``) is counted once, however many times it runs.
    ``cost_analysis()`` may return a dict or a list of dicts (one per module); their flops are summed.
    """
    ca = compiled.cost_analysis()
    parts = [ca] if isinstance(ca, dict) else list(ca or [])
    if not any(parts):
        raise ValueError(f"cost_analysis() reported nothing for this executable: {ca!r}")
    # A module of only data movement and transcendentals reports no "flops" key: that is zero.
    return sum(float(p.get("flops", 0.0)) for p in parts if p)


def compiled_memory(compiled: Any) -> dict[str, int]:
    """Per-device memory of ``compiled`` in bytes, from ``memory_analysis()``.

    Keys: ``argument``, ``output``, ``temp``, ``alias`` (outputs sharing an argument's buffer, e.g.
    donated), ``generated_code``, and ``peak`` = argument + output + temp - alias (an upper-bound
    estimate: it assumes every buffer is live at once). ``xla_peak`` is added when XLA reports its own.
    """
    m = compiled.memory_analysis()
    if isinstance(m, (list, tuple)):
        m = m[0] if len(m) == 1 else None
    if m is None:
        raise ValueError(f"memory_analysis() gave no single result for this executable: {m!r}")
    out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias",
                                                                "generated_code")}
    out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    if getattr(m, "peak_memory_in_bytes", None) is not None:
        out["xla_peak"] = int(m.peak_memory_in_bytes)
    return out
