"""Experiment configs: one ``get_config(arg)`` file per setting (big_vision style)."""
