"""The proof: one parity engine against the eager model in float64, its backends, `verify`."""
