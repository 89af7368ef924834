"""`UnevenPlan`: device groups, each group's share of the batch, and the predicted times."""
from __future__ import annotations

import dataclasses

from tag_jax.uneven.groups import Group


@dataclasses.dataclass(frozen=True)
class GroupShare:
    group: Group
    share: int               # examples of the global batch
    time_s: float            # predicted time of the group's program
    idle_s: float            # waiting for the slowest group before the combining program
    peak_memory_bytes: int   # per device, with the state it holds

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
                 f"(groups {_seconds(self.groups_s)} + combine {_seconds(self.combine_s)} + "
                 f"apply {_seconds(self.apply_s)})",
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
        lines.append(f"  combine: all-reduce of {_bytes(self.combine_bytes)} per device over "
                     f"{len(self.device_ids)} devices")
        return "\n".join(lines)
