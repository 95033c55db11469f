"""Fleet groups: volumes on several hosts captured at one instant, always thawed.

``agent`` runs on each host (started over SSH; its stdin is the channel, and it is the
Freezer's controller there); ``coordinator`` runs on the controller (the Ansible module
``quiesce.fleet.group`` calls it) and drives every agent; ``clock`` maps each host's
monotonic clock onto the controller's; ``verdict`` proves (or fails to prove) the one
instant at which every volume of every host was frozen.
"""
