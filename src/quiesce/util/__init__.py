"""Utilities that are not about the operating system, below every other layer: typed
progress events (:mod:`.events`), secrets out of every output (:mod:`.redact`), human
durations and sizes (:mod:`.units`), PEP 562 lazy exports (:mod:`.lazy`)."""
