"""A gdb server for kvmsys guests (GDB's remote serial protocol)::

    server = GdbServer("127.0.0.1:1234", vcpus=1)    # or a Unix socket path
    # on each vCPU's thread:
    with server.attach(vcpu, vcpu.run) as run:        # or kvmsys.run (syscall ABI)
        exit = run(timeout=...)                       # stops first, until gdb continues

`kvmsys run --guest NAME --gdb ADDRESS` does this for the built-in guests.
"""
from .server import GdbKilled, GdbServer, parse_address

__all__ = ["GdbServer", "GdbKilled", "parse_address"]
