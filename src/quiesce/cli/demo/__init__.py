"""The built-in demos (`quiesce demo`, `quiesce demo --simple`)."""
