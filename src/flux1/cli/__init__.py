"""Command-line programs (main.py, save.py)."""
