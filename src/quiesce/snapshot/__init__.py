"""Layer snapshot: the create engine, manifests, consistency, snapshot mounts and deletion."""
