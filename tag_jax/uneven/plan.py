"""`UnevenPlan`: device groups, each group's share of the batch, and the predicted times."""
from __future__ import annotations

import dataclasses
from typing import Any

from tag_jax.uneven.groups import Group


@dataclasses.dataclass(frozen=True)
class GroupShare:
    group: Group
    share: int               # examples of the global batch
    time_s: float            # predicted time of the group's program
    idle_s: float            # waiting for the slowest group before the combining program
    peak_memory_bytes: int   # per device, with the state it holds
    collective_pairs: tuple[tuple[str, int], ...] = ()  # per device, by kind, its program's
    strategy: Any = dataclasses.field(default=None, compare=False, repr=False)  # mode "spmd"
    exposed_s: float = 0.0   # mode "one": the last microbatch's all-reduce not hidden by its backward

    @property
    def local_batch(self) -> int:
        return self.share // self.group.size


@dataclasses.dataclass(frozen=True)
class UnevenPlan:
    """The groups taking part (`groups`, fastest first), those given nothing (`left_out`), and the
    prediction: step = slowest group + combining all-reduce + optimizer update."""

    groups: tuple[GroupShare, ...]
    batch: int
    combine_s: float
    combine_bytes: int        # per device, all-reduce
    apply_s: float
    left_out: tuple[Group, ...] = ()
    relaxed: tuple[float, ...] = ()  # the LP relaxation's continuous shares
    topology_name: str = ""
    local: int = 1            # sub-group size of the layout (`tag_jax.uneven.layout`); 1 = flat
    gather_pairs: tuple[tuple[str, int], ...] = ()    # per device, each group program's collectives
    combine_pairs: tuple[tuple[str, int], ...] = ()   # per device, the combining program's, by kind
    spmd_step_time_s: float | None = None  # the best single-SPMD plan's, when compared
    group_program: str = "rows"  # "rows": per-device gradients; "spmd": `group_spmd` programs;
    #                              "one": one program over all devices (`tag_jax.uneven.one`)
    microbatch: int = 0          # mode "one": examples per microbatch
    overlapped_comm_s: float = 0.0  # mode "one": the all-reduce's duration, overlapped with the last backward

    @property
    def counts(self) -> tuple[int, ...]:
        """Mode "one": microbatches per device of each group (in the order of `groups`)."""
        if self.group_program != "one" or self.microbatch < 1:
            return ()
        return tuple(g.share // (g.group.size * self.microbatch) for g in self.groups)

    @property
    def gather(self) -> dict[str, int]:
        return dict(self.gather_pairs)

    @property
    def combine_kinds(self) -> dict[str, int]:
        if not self.combine_pairs and self.combine_bytes:
            return {"all-reduce": self.combine_bytes}
        return dict(self.combine_pairs)

    def compared_with(self, spmd_step_time_s: float) -> "UnevenPlan":
        """This plan, noting the single-SPMD step time it is compared with (shown by `summary`)."""
        return dataclasses.replace(self, spmd_step_time_s=float(spmd_step_time_s))

    @property
    def groups_s(self) -> float:
        return max(g.time_s for g in self.groups)

    @property
    def step_time_s(self) -> float:
        return self.groups_s + self.combine_s + self.apply_s

    @property
    def device_ids(self) -> tuple[int, ...]:
        """The devices of the combining and apply programs: the groups' devices, group by group."""
        return tuple(i for g in self.groups for i in g.group.device_ids)

    @property
    def shares(self) -> tuple[int, ...]:
        return tuple(g.share for g in self.groups)

    def summary(self) -> str:
        from tag_jax.plan import _bytes, _seconds

        lines = [f"Uneven plan on '{self.topology_name}': global batch {self.batch} over "
                 f"{len(self.groups)} group(s), predicted step {_seconds(self.step_time_s)} "
                 + (f"(slowest device {_seconds(self.groups_s)}, its all-reduce overlapped, + apply "
                    f"{_seconds(self.apply_s)})" if self.group_program == "one" else
                    f"(groups {_seconds(self.groups_s)} + combine {_seconds(self.combine_s)} + "
                    f"apply {_seconds(self.apply_s)})"),
                 f"  {'group':<16} {'devices':<18} {'share':>6} {'per dev':>7} {'time':>10} "
                 f"{'idle':>10} {'peak mem':>10}"]
        for g in self.groups:
            ids = ",".join(map(str, g.group.device_ids))
            lines.append(f"  {g.group.name:<16} {ids:<18} {g.share:>6} {g.local_batch:>7} "
                         f"{_seconds(g.time_s):>10} {_seconds(g.idle_s):>10} "
                         f"{_bytes(g.peak_memory_bytes):>10}")
        for g in self.left_out:
            lines.append(f"  {g.name:<16} {','.join(map(str, g.device_ids)):<18} {0:>6}  "
                         "(left out: slower with it than without)")
        n = len(self.device_ids)
        if self.group_program == "one":
            counts = ", ".join(f"{g.group.name}: {c}" for g, c in zip(self.groups, self.counts))
            exposed = ", ".join(f"{g.group.name} {_seconds(g.exposed_s)}" for g in self.groups)
            lines.append(f"  one program over {n} devices: microbatches of {self.microbatch} example(s), "
                         f"microbatches per device {counts}; no collective inside the loop")
            lines.append(f"  the last microbatch's all-reduce of "
                         f"{_bytes(self.combine_kinds.get('all-reduce', 0))} per device "
                         f"({_seconds(self.overlapped_comm_s)}) overlaps its backward pass (exposed: "
                         f"{exposed}); state replicated, the update on every device")
        elif self.group_program == "spmd":
            lines.append(f"  group programs: one SPMD program per group on (data, local={self.local}) "
                         "sub-meshes, gradients reduced within the group")
            for g in self.groups:
                kinds = ", ".join(f"{k} {_bytes(v)}" for k, v in g.collective_pairs if v) or "none"
                lines.append(f"    {g.group.name}: collectives per device: {kinds}")
            lines.append(f"  combine: all-reduce of {_bytes(self.combine_kinds.get('all-reduce', 0))} "
                         f"per device across {n // self.local} sub-groups; the update runs on "
                         f"1/{self.local} shards")
        elif self.local > 1:
            kinds = self.combine_kinds
            lines.append(f"  layout: state sharded over sub-groups of {self.local} device(s); each group "
                         f"program all-gathers {_bytes(self.gather.get('all-gather', 0))} of parameters "
                         f"within its sub-groups; the optimizer update runs on 1/{self.local} shards")
            lines.append(f"  combine: reduce-scatter of {_bytes(kinds.get('reduce-scatter', 0))} per "
                         f"device within sub-groups, all-reduce of {_bytes(kinds.get('all-reduce', 0))} "
                         f"across {n // self.local} sub-groups")
        else:
            lines.append(f"  combine: all-reduce of {_bytes(self.combine_bytes)} per device over "
                         f"{n} devices; state replicated")
        if self.spmd_step_time_s is not None:
            lines.append(f"  one SPMD program would take {_seconds(self.spmd_step_time_s)}: uneven "
                         f"{self.spmd_step_time_s / self.step_time_s:.2f}x")
        return "\n".join(lines)
