"""kmux-cli: the operator's view of a running daemon, its tables and its metrics."""
