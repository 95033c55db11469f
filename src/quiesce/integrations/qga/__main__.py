"""``python3 -B -m quiesce.integrations.qga freeze|thaw``: the hook without the CLI's
start-up (typer and rich are never imported: the agent waits for this process)."""

import sys

from quiesce.integrations.qga.hook import main

sys.exit(main())
