# cython: language_level=3
"""kvmsys._core: the compiled core shared by both ABIs.

Kernel objects (system, VM, vCPU), the comm area, exits, the run loop and the
thread binding of the syscall-style ABI.  Policy and documentation live in
the Python package; this module checks every size, offset and id it is given.
"""
# Declarations of each concept live in their own .pxd, implementations in the
# matching .pyx; this module includes them all (one extension, like uvloop).
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from includes.kvm cimport *
from includes.posix cimport *

include "runstate.pxd"

from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcpy, memset

include "errors.pyx"
include "mapping.pyx"
include "runstate.pyx"
include "signals.pyx"
include "system.pyx"
include "vm.pyx"
include "exits.pyx"
include "vcpu.pyx"
include "binding.pyx"
include "reference.pyx"
include "caps.pyx"

# Constants the Python layer needs, resolved from <linux/kvm.h> at build time.
H_KINDS = dict(PYTHON=H_PYTHON, SINK=H_SINK, CONST=H_CONST, IGNORE=H_IGNORE, EXIT=H_EXIT)
SPACES = dict(PIO=SPACE_PIO, MMIO=SPACE_MMIO)
EXIT_REASONS = {name: num for num, name in _EXIT_NAMES.items()}
MEM_FLAGS = dict(LOG_DIRTY_PAGES=KVM_MEM_LOG_DIRTY_PAGES, READONLY=KVM_MEM_READONLY)
