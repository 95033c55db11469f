#!/usr/bin/python
"""quiesce.fleet.info: what quiesce a host has, and its volumes (read-only)."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: info
short_description: Report the host's quiesce version and its volumes
version_added: "0.1.0"
description:
  - Imports the quiesce library with the host's C(ansible_python_interpreter) and reads
    the mount table through C(quiesce.host.mounts.MountTable), the same view of volumes
    (one per superblock, with every place it is mounted) that a freeze would use.
  - Changes nothing; supports check mode. The first step of any fleet run, so that a host
    that cannot import quiesce fails before anything is frozen anywhere.
options:
  paths:
    description:
      - Report only the volumes holding these paths (each must exist).
      - Without it, every volume backed by a block device (C(source) under C(/dev/)).
    type: list
    elements: path
requirements:
  - quiesce importable by the interpreter Ansible runs on the host
author:
  - quiesce maintainers
"""

EXAMPLES = r"""
- name: Which volumes would a fleet freeze touch here?
  quiesce.fleet.info:
    paths:
      - /srv/db
      - /srv/wal
  register: info
"""

RETURN = r"""
quiesce_version:
  description: The quiesce version the host imports.
  returned: always
  type: str
quiesce_path:
  description: Where that quiesce package lives on the host.
  returned: always
  type: str
python:
  description: The interpreter that ran the module.
  returned: always
  type: str
volumes:
  description: One entry per volume (superblock).
  returned: always
  type: list
  elements: dict
  contains:
    dev: {description: "major:minor of the superblock", type: str}
    fstype: {description: filesystem type, type: str}
    source: {description: mount source (e.g. the block device), type: str}
    mount_point: {description: the volume's most natural mount point, type: str}
    mount_points: {description: every place it is mounted, type: list, elements: str}
    read_only: {description: the superblock is read-only, type: bool}
"""

import os
import sys
import traceback

from ansible.module_utils.basic import AnsibleModule


def volume_dict(vol):
    return {
        "dev": vol.dev,
        "fstype": vol.fstype,
        "source": vol.source,
        "mount_point": vol.mount_point,
        "mount_points": sorted({m.mount_point for m in vol.mounts}),
        "read_only": vol.read_only,
    }


def main():
    module = AnsibleModule(
        argument_spec={"paths": {"type": "list", "elements": "path"}},
        supports_check_mode=True,
    )
    try:
        import quiesce
        from quiesce.host.mounts import MountTable
    except ImportError as e:
        module.fail_json(
            msg=f"quiesce is not importable by {sys.executable}: {e}",
            hint="install quiesce for that interpreter, or set ansible_python_interpreter",
            exception=traceback.format_exc(),
        )
    table = MountTable.read()
    paths = module.params["paths"]
    if paths:
        volumes = []
        for path in paths:
            vol = table.volume_of_path(path)
            if vol is None:
                module.fail_json(msg=f"{path}: no such path, or not on a known mount")
            if vol not in volumes:
                volumes.append(vol)
    else:
        volumes = [v for v in table.volumes.values() if v.source.startswith("/dev/")]
    module.exit_json(
        changed=False,
        quiesce_version=quiesce.__version__,
        quiesce_path=os.path.dirname(quiesce.__file__),
        python=sys.executable,
        volumes=[volume_dict(v) for v in volumes],
    )


if __name__ == "__main__":
    main()
