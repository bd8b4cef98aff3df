"""jclip.evals."""
