"""Experiments built on nmsparse: models, configs and training entry points."""
