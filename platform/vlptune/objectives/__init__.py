"""Pretext tasks, one module each, registered by name (see registry.py)."""
