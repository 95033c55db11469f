"""Layer freezing: the plan (order, hazards), the freezer, and the guardian that
guarantees the thaw."""
