"""quiesce inside a virtual machine: qemu-guest-agent's fsfreeze hook with a watchdog.

``hook`` is what the agent runs (``freeze``/``thaw``), ``watchdog`` the process that outlives
the hook and thaws the agent's freeze itself if the thaw never comes, ``config`` the guest's
job file, ``install`` what ``quiesce install-qga-hook`` writes. docs/vm.md tells the story.
"""
