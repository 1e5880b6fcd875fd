"""The sans-IO cores: no socket, no trio, no select. Plain classes that take bytes and events and return decisions."""
