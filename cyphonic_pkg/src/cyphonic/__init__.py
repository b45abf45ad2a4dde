"""CYPHONIC: a zero-trust overlay network (node, adapter and cloud daemons)."""

__version__ = "0.1.0"
