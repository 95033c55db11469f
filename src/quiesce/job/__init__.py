"""Layer job: the job schema and its validation, building quiescers, running the phases,
the report."""
