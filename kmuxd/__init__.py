"""kmuxd: a user-space Kernel Connection Multiplexor.

Unprivileged apps send whole messages over a SOCK_SEQPACKET socket; the
daemon writes each atomically on one of a group's shared TCP connections and
steers framed replies back. See README.md and docs/.
"""

__version__ = "0.1.0"
