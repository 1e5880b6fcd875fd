"""The I/O shell: trio tasks and the event core that move bytes between sockets and the cores."""
