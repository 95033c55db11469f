"""Layer sys: the kernel and the OS: mountinfo, FIFREEZE/FITHAW/FICLONE/syncfs, the one
child-process runner, units."""
