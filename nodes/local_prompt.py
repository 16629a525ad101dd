"""Placeholder until this node module lands."""
NODES = []
