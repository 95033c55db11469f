import sys

sys.dont_write_bytecode = True

from quiesce.cli.entry import main  # noqa: E402

main()
