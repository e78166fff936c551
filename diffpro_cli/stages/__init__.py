"""One module per pipeline stage; each exposes plain functions that the CLI calls."""
