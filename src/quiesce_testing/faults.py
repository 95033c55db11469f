"""Fleet agents with a fault, for negative controls: each speaks the agent's protocol and
misbehaves in one way the controller must catch. A test runs one on a host by naming it
in the host's ``Member(agent=...)``; the product has no switch for any of them.

``python -m quiesce_testing.faults early-thaw SECONDS``: after saying "frozen" (mode
command), the host thaws by itself that long after its freeze and says nothing, as a
foreign FITHAW that went unnoticed would; the verdict must not prove an instant then.
"""

from __future__ import annotations

import sys
import time

from quiesce.integrations.fleet.agent import Agent, main


class EarlyThawAgent(Agent):
    """Thaws unasked ``after_s`` after its freeze (thaw reason ``test-early``)."""

    after_s = 0.0

    def frozen_sent(self) -> None:
        time.sleep(self.after_s)
        self.thaw_now("test-early")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "early-thaw":
        sys.exit("usage: python -m quiesce_testing.faults early-thaw SECONDS")
    EarlyThawAgent.after_s = float(sys.argv[2])
    main(EarlyThawAgent)
