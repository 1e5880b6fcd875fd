"""Operator and developer tools that the daemon never imports: the demo, the benchmark and their backend."""
