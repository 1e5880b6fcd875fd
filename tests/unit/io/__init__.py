"""Unit tests of the I/O shell: real socket pairs, a fake clock, no daemon."""
