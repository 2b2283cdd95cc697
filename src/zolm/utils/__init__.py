"""Layer 0: helpers that depend only on the standard library, numpy and torch."""
