"""Data commands: make-toy-market, subset (filled in by the foundation work)."""
