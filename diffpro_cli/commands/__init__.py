"""Typer command functions, one module per subcommand; each is a thin layer over a stage module."""
