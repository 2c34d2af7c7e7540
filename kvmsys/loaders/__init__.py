"""Boot loaders that put a kernel straight into guest RAM and set up the vCPU the
way its boot protocol says, with no firmware: Multiboot (version 1) and Linux's x86
boot protocol (64-bit entry)."""
from .linux import LinuxBootError, enter as enter_linux, is_bzimage, load_linux  # noqa: F401
from .multiboot import MultibootError, enter as enter_multiboot, load_multiboot  # noqa: F401

__all__ = ["LinuxBootError", "enter_linux", "is_bzimage", "load_linux", "MultibootError", "enter_multiboot",
           "load_multiboot"]
