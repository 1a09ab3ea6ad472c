"""Balancing policies: sans-IO classes that pick an upstream and learn from outcomes."""
