"""jclip.convert."""
