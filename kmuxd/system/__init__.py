"""System glue: configuration, systemd, logging, installation."""
