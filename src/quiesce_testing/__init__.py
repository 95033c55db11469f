"""quiesce's test ground, apart from the product: simulated fleet hosts on this machine
(:mod:`.ground`: sshd per host in its own mount namespace, loop-image filesystems, real
Ansible over SSH), the writer that hops across them and the check of a cut
(:mod:`.ground_writer`), and agents with faults for negative controls (:mod:`.faults`).

The tests and ``quiesce demo --fleet`` use it; ``import quiesce`` never does (a test
keeps it so). It ships beside ``quiesce`` so that the demo works from an installed
package; docs/architecture.md says why.
"""
