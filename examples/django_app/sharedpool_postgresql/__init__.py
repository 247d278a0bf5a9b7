"""A Django database ENGINE: Django's PostgreSQL backend, its pool leased (see base.py)."""
