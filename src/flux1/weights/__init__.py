"""Reading weight files."""
