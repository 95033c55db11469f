"""Backup targets behind one interface: restic, borg, tar."""
