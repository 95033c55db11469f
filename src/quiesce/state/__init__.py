"""Layer state: the root-only state directory, the cleanup journal, locks and retention."""
