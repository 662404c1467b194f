"""Command-line edge: argument parsing, printing and exit codes. Logic lives in the package."""
