"""Layer integrations: systemd units and Prometheus metrics."""
