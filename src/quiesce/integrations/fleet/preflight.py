"""What the per-host modules do: check a host before the group, thaw it after."""

from __future__ import annotations

from typing import Any

from quiesce.errors import AlreadyFrozen


def check_host(volumes: list[str]) -> dict[str, Any]:
    """Resolve the plan (refusals included) and refuse volumes another run holds frozen."""
    import quiesce
    import quiesce.integrations.fleet.agent
    from quiesce.freezing.guardian import holder_of
    from quiesce.freezing.plan import make_plan

    with make_plan(volumes) as plan:
        plan.check()
        vols = [
            {"mount_point": m.name, "dev": m.volume.dev, "fstype": m.volume.fstype}
            for m in plan.members
            if not m.skip
        ]
    for v in vols:
        st = holder_of(v["dev"])
        if st is not None:
            raise AlreadyFrozen(
                f"{v['mount_point']} is already frozen by quiesce (guardian {st['pid']})",
                "wait for that run, or end it with `quiesce thaw`",
            )
    return {"quiesce_version": quiesce.__version__, "volumes": vols}


def thaw_host(volumes: list[str]) -> tuple[list[str], list[str]]:
    """Ask every guardian holding one of ``volumes`` frozen to thaw it: (thawed, errors)."""
    from quiesce.freezing.guardian import survey, thaw
    from quiesce.host.mounts import MountTable

    table = MountTable.read()
    devs = {v.dev for p in volumes if (v := table.volume_of_path(p)) is not None}
    thawed, errors = [], []
    for st in survey().active:
        mine = [v for v in st.get("volumes", []) if v["dev"] in devs and v["state"] == "frozen"]
        if not mine:
            continue
        try:
            reply = thaw(st["pid"], [v["dev"] for v in mine])
        except Exception as e:
            errors.append(f"guardian {st['pid']}: {e}")
            continue
        if reply.get("ok") or reply.get("expired"):
            thawed += [v["mount_point"] for v in mine]
        else:
            errors.append(f"guardian {st['pid']}: {reply.get('error')}")
    return thawed, errors
