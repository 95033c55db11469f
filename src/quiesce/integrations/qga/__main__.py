"""``python3 -B -m quiesce.integrations.qga freeze|thaw [--job PATH]``: the hook without
the CLI's start-up. ``thaw`` imports the standard library only (it may run under
``python -S``): the agent waits for it, and its start-up counts in the window."""

import sys

if sys.argv[1:2] == ["thaw"]:
    from quiesce.integrations.qga.thaw import main as thaw_main

    sys.exit(thaw_main(sys.argv[2:]))
else:
    from quiesce.integrations.qga.hook import main

    sys.exit(main())
