"""The request guard: abuse and injection detection, rate limits."""
