#!/usr/bin/python
"""quiesce.fleet.thaw: the play's safety net: thaw whatever quiesce holds on these volumes."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: thaw
short_description: Thaw any quiesce freeze of these volumes on this host (idempotent)
version_added: "0.2.0"
description:
  - For an C(always:) section. Asks every quiesce guardian on the host that holds one of
    C(volumes) frozen to thaw it now. Nothing frozen is not an error. The agents thaw by
    themselves anyway (EOF, lease, deadline); this makes it explicit and says what it did.
options:
  volumes: {description: mount points of the group on this host, type: list, elements: path, required: true}
author:
  - quiesce maintainers
"""

from ansible.module_utils.basic import AnsibleModule


def main():
    module = AnsibleModule(
        argument_spec={"volumes": {"type": "list", "elements": "path", "required": True}}
    )
    try:
        from quiesce.integrations.fleet.preflight import thaw_host
    except ImportError as e:
        module.fail_json(msg=f"quiesce is not importable: {e}")
    thawed, errors = thaw_host(module.params["volumes"])
    if errors:
        module.fail_json(msg="; ".join(errors), thawed=thawed)
    module.exit_json(changed=bool(thawed), thawed=thawed)


if __name__ == "__main__":
    main()
