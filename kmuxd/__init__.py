"""kmuxd: a user-space Kernel Connection Multiplexor.

Unprivileged apps send whole messages over a SOCK_SEQPACKET socket; the
daemon writes each atomically on one of a group's shared TCP connections and
steers framed replies back. See README.md and docs/.
"""

__version__ = "0.1.0"

from ._compiled import install_guard as _install_guard  # noqa: E402

# Before any data-path module is imported: compiled extensions, or all from source.
_install_guard()
