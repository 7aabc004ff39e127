"""The Ray object-store tier below every replica's pool: the store actor (storage),
the replica's client, and when to load rather than compile (policy)."""
