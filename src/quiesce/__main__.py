import sys

sys.dont_write_bytecode = True

from quiesce.cli.app import main  # noqa: E402

main()
