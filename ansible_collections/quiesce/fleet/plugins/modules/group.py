#!/usr/bin/python
"""quiesce.fleet.group: one group snapshot across hosts (runs on the controller)."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: group
short_description: Freeze volumes on several hosts at one proven instant, snapshot, thaw
version_added: "0.2.0"
description:
  - Runs on the controller (C(delegate_to: localhost), C(run_once: true)). Starts one
    quiesce agent per host over SSH (C(python3 -m quiesce.integrations.fleet.agent));
    the agent is the Freezer's controller on its host and its stdin is the SSH channel.
  - Every host thaws by itself when its channel ends (ansible-playbook killed), when
    the controller's lease lapses (network broken), or at the group's deadline.
  - The report proves (or not) one instant at which every volume of every host was
    frozen, from the hosts' own clocks mapped onto the controller's with measured
    offsets and error bounds. Snapshots of a group that is not proven are deleted.
  - Thin wrapper over C(quiesce.integrations.fleet.coordinator.run_group).
options:
  members:
    description: One dict per host (name, ssh argv, volumes, python, pythonpath,
      provider, writers); build it from hostvars, see the collection's playbook.
    type: list
    elements: dict
    required: true
  mode:
    description: C(hosts) (each host's own provider, armed for an agreed instant) or
      C(command) (one command for the whole group, run here while all are frozen).
    type: str
    choices: [hosts, command]
    default: hosts
  command: {description: argv of the group command (mode command), type: list, elements: str}
  command_timeout: {description: seconds the command may take, type: float, default: 10}
  name: {description: the group snapshot's name, type: str, default: fleet}
  deadline: {description: each host's guardian thaws this long after its freeze, type: float, default: 30}
  lease: {description: a host thaws after this long without a word from the controller, type: float, default: 5}
  hold: {description: mode hosts, how long after the agreed instant hosts stay frozen, type: float, default: 0.03}
  lead: {description: mode hosts, how far ahead the instant is set, type: float, default: 0.3}
  attempts:
    description: mode hosts, how many windows to try when the only problem was a hold too
      short for how late the hosts froze (nothing of a failed attempt is kept; the next
      one holds longer)
    type: int
    default: 3
  report: {description: write the JSON report to this file on the controller, type: path}
author:
  - quiesce maintainers
"""

RETURN = r"""
consistent: {description: one instant proven and nothing failed, returned: always, type: bool}
report: {description: the group report, returned: always, type: dict}
"""

import json
import os

from ansible.module_utils.basic import AnsibleModule


def main():
    module = AnsibleModule(
        argument_spec={
            "members": {"type": "list", "elements": "dict", "required": True},
            "mode": {"type": "str", "choices": ["hosts", "command"], "default": "hosts"},
            "command": {"type": "list", "elements": "str"},
            "command_timeout": {"type": "float", "default": 10.0},
            "name": {"type": "str", "default": "fleet"},
            "deadline": {"type": "float", "default": 30.0},
            "lease": {"type": "float", "default": 5.0},
            "hold": {"type": "float", "default": 0.03},
            "lead": {"type": "float", "default": 0.3},
            "attempts": {"type": "int", "default": 3},
            "report": {"type": "path"},
        },
    )
    try:
        from quiesce.errors import QuiesceError
        from quiesce.integrations.fleet.coordinator import Member, ancestors, run_group
    except ImportError as e:
        module.fail_json(msg=f"quiesce is not importable on the controller: {e}")
    p = module.params
    try:
        members = [Member(**m) for m in p["members"]]
        report = run_group(
            members, name=p["name"], mode=p["mode"], command=p["command"],
            command_timeout=p["command_timeout"], deadline_s=p["deadline"],
            lease_s=p["lease"], hold_s=p["hold"], lead_s=p["lead"],
            attempts=p["attempts"], watch_pids=ancestors(),
        )  # fmt: skip
    except (QuiesceError, TypeError) as e:
        hint = getattr(e, "hint", None)
        module.fail_json(msg=f"{e} ({hint})" if hint else str(e))
    if p["report"]:
        with open(p["report"] + ".tmp", "w") as f:
            json.dump(report, f, indent=2)
        os.replace(p["report"] + ".tmp", p["report"])
    result = {"changed": report["kept"], "consistent": report["consistent"], "report": report}
    if not report["consistent"]:
        module.fail_json(
            msg="fleet group not consistent: " + "; ".join(report["reasons"]), **result
        )
    module.exit_json(
        msg=f"consistent: window {report['window_s']:.4f} s, skew {report['skew_s']:.4f} s, "
        f"overlap {report['overlap_s']:.4f} s",
        **result,
    )


if __name__ == "__main__":
    main()
