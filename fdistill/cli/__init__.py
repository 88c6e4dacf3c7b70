"""Command-line interface: a thin layer over library functions (no logic here)."""
