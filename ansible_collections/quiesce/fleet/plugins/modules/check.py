#!/usr/bin/python
"""quiesce.fleet.check: can this host join a group freeze? (read-only)"""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: check
short_description: Check, before anything is frozen anywhere, that a host can join a group
version_added: "0.2.0"
description:
  - Imports quiesce and its fleet agent, resolves C(volumes) into a freeze plan (each
    must be a mount root of a filesystem that can be frozen, not quiesce's own), and
    refuses a volume another quiesce run holds frozen. Changes nothing.
  - A host that fails here (or is unreachable) stops the play before the group task,
    with C(any_errors_fatal), so nothing is frozen on any host.
options:
  volumes: {description: mount points to freeze on this host, type: list, elements: path, required: true}
author:
  - quiesce maintainers
"""

import sys

from ansible.module_utils.basic import AnsibleModule


def main():
    module = AnsibleModule(
        argument_spec={"volumes": {"type": "list", "elements": "path", "required": True}},
        supports_check_mode=True,
    )
    try:
        from quiesce.errors import QuiesceError
        from quiesce.integrations.fleet.preflight import check_host
    except ImportError as e:
        module.fail_json(
            msg=f"quiesce (with its fleet agent) is not importable by {sys.executable}: {e}"
        )
    try:
        result = check_host(module.params["volumes"])
    except QuiesceError as e:
        module.fail_json(msg=e.message, hint=e.hint)
    module.exit_json(changed=False, **result)


if __name__ == "__main__":
    main()
