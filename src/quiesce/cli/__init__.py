"""Layer cli: the typer app; the only place that prints for humans or picks exit codes."""
