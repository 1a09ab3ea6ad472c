"""Baselines the guard is measured against: ModSecurity + OWASP CRS (``crs``). Off the hot path."""
