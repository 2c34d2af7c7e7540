# The VM object: memory slots, interrupt plumbing, fast handlers, console.
from posix.stat cimport struct_stat, fstat, S_ISREG
from libc.string cimport memcpy
from bisect import bisect_right
from collections import namedtuple
import weakref

CoalescedWrite = namedtuple("CoalescedWrite", "space address data", module="kvmsys._core")
CoalescedWrite.__doc__ = (
    "A write taken from the coalesced ring by register_coalesced(unregister=True) that only "
    "a run() could deliver (its range is a PYTHON or EXIT one): space (Space.PIO or "
    "Space.MMIO), guest address (port), data (the bytes written, little-endian).")


cdef class MemorySlot:
    """One KVM memory slot: ``slot``, ``guest_phys_addr``, ``size``, ``flags``
    (KVM_MEM_*) and, for a slot backed by a guest_memfd, ``guest_memfd_offset``."""
    cdef readonly int slot
    cdef readonly uint64_t guest_phys_addr
    cdef readonly uint64_t size
    cdef readonly uint32_t flags
    cdef readonly uint64_t guest_memfd_offset
    cdef bint region2               # made with KVM_SET_USER_MEMORY_REGION2
    cdef Mapping mapping

    def __init__(self, *args, **kwargs):
        raise ArgumentTypeError("MemorySlot objects come from Vm.add_memory(); they cannot be constructed")

    def view(self):
        """Writable zero-copy memoryview of the slot's memory."""
        return memoryview(self.mapping)

    def __repr__(self):
        gmem = f", guest_memfd_offset={self.guest_memfd_offset:#x}" if self.flags & KVM_MEM_GUEST_MEMFD else ""
        return (f"MemorySlot(slot={self.slot}, gpa={self.guest_phys_addr:#x}, "
                f"size={self.size:#x}, flags={self.flags:#x}{gmem})")


cdef Mapping map_source(object source, uint64_t off, uint64_t size, long page, bint huge, str what):
    """The host memory of a new slot: fresh, an fd's pages, or a caller's buffer."""
    cdef void *addr
    cdef int fd
    cdef struct_stat st
    cdef uint8_t[::1] buf
    if source is None:
        addr = mmap(NULL, size, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | (MAP_HUGETLB if huge else 0), -1, 0)
        if addr == MAP_FAILED:
            raise_os(errno, "mmap(guest memory, MAP_HUGETLB)" if huge else "mmap(guest memory)")
        return Mapping.wrap(addr, size, what)
    if isinstance(source, int) or hasattr(source, "fileno"):
        fd = source if isinstance(source, int) else source.fileno()
        require(fd >= 0, "the source fd must be open")
        require(off % page == 0, f"a file offset must be a multiple of the page size ({page})")
        if fstat(fd, &st) != 0:
            raise_os(errno, "fstat(memory source)")
        # a shorter file would SIGBUS the guest (and us) past its end
        require(S_ISREG(st.st_mode) and <uint64_t>st.st_size >= off + size,
                f"the source must be a file (memfd, regular, hugetlbfs) of at least offset + size = "
                f"{off + size:#x} bytes (it has {st.st_size:#x})")
        addr = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, off)
        if addr == MAP_FAILED:
            raise_os(errno, "mmap(memory source)")
        return Mapping.wrap(addr, size, what)
    try:
        buf = source
    except (TypeError, ValueError, BufferError) as e:
        raise InvalidArgumentError(f"source must be an fd, a file or a writable contiguous buffer: {e}") from None
    require(<uint64_t>buf.shape[0] >= off + size,
            f"the buffer has {buf.shape[0]:#x} bytes, offset + size is {off + size:#x}")
    addr = <void *>&buf[off]
    require(<size_t>addr % page == 0, f"the buffer's address + offset must be page-aligned ({page})")
    return Mapping.borrow(addr, size, what, buf)


cdef int fill_enable_cap(kvm_enable_cap *c, object cap, object flags, object args) except -1:
    cdef list items = as_list(args, "capability arguments")
    require(len(items) <= 4, "at most 4 capability arguments")
    memset(c, 0, sizeof(kvm_enable_cap))
    c.cap = as_u32(cap, "capability number")
    c.flags = as_u32(flags, "flags")
    for i, a in enumerate(items):
        c.args[i] = as_u64(a, "capability argument")
    return 0


# What the run loop can call for an exit: a callable, or (*ops_ok*: IO/MMIO exits, taken
# decoded) an AccessOps; None for none.
cdef int check_exit_callback(object fn, str what, bint ops_ok) except -1:
    if fn is None or callable(fn) or (ops_ok and type(fn) is AccessOps):
        return 0
    raise ArgumentTypeError(f"{what} must be callable{', an AccessOps' if ops_ok else ''} or None, "
                            f"not {type(fn).__name__}")


cdef class VmCore:
    """A KVM VM fd.  Memory, devices and vCPUs hang off it.

    ``kvm``: the KvmCore it came from; ``mmap_size``: bytes of each vCPU's comm area;
    ``max_slots``: memory slots KVM allows (KVM_CAP_NR_MEMSLOTS); ``has_irqchip``,
    ``split_irqchip``: whether an in-kernel irqchip (split: local APICs only) exists;
    ``dirty_ring_size``: bytes of each vCPU's dirty ring, 0 for none;
    ``has_sync_regs``: whether KVM syncs registers through the comm area
    (KVM_CAP_SYNC_REGS); ``vcpu_ids``: the ids of the vCPUs KVM has for this VM."""
    # A VM fd, its memory slots, fast-handler table and console buffer.
    cdef int fd
    cdef vmstate_t *state
    cdef readonly KvmCore kvm
    cdef readonly size_t mmap_size
    cdef readonly int max_slots
    cdef dict slots                 # slot -> MemorySlot
    cdef list starts                # guest-physical starts of the slots, sorted (bisect)
    cdef list by_start              # the MemorySlot of each entry of starts
    cdef list py_handlers           # handler index -> callable or None
    cdef object _default_handler
    cdef object _hlt_handler        # set_hlt_action(PYTHON, callback), or None
    cdef readonly int has_irqchip
    cdef readonly int split_irqchip     # local APICs in the kernel, PIC/IOAPIC in user space
    cdef readonly uint32_t dirty_ring_size     # bytes per vCPU, 0: no dirty ring
    cdef readonly int has_sync_regs
    cdef readonly set vcpu_ids
    cdef _WeakRefs vcpus             # the live VcpuCore, closed with the VM
    cdef set coalesced_zones        # registered (addr, size, pio)
    cdef Mapping ring_page          # the coalesced ring (state.ring), mapped from the first vCPU
    cdef unsigned long forkgen      # the process that created it
    cdef object __weakref__

    def __cinit__(self, kvm, vm_type=0, *, fd=None):
        self.fd = -1
        kvmsys_atfork_install()         # a fork child must know this VM is not its own
        self.forkgen = kvmsys_fork_generation
        cdef KvmCore kvm_ = of_type(kvm, KvmCore, "kvm")
        cdef unsigned long vm_type_ = as_u32(vm_type, "VM type")
        kvm_.require_open()
        first_vm()
        self.kvm = kvm_
        self.slots = {}
        self.starts = []
        self.by_start = []
        self.py_handlers = []
        self.vcpu_ids = set()
        self.vcpus = _WeakRefs()
        self.coalesced_zones = set()
        self.mmap_size = kvm_.ioctl_int(KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")
        if fd is None:
            self.fd = kvm_.ioctl_int(KVM_CREATE_VM, vm_type_, "KVM_CREATE_VM")
        else:       # a VM made elsewhere (a duplicate of its fd): its slots are not ours to know
            self.fd = adopt_fd(fd, "kvm-vm")
        self.state = <vmstate_t *>calloc(1, sizeof(vmstate_t))
        if self.state == NULL:
            raise MemoryError()
        vm_init(self.state, self.fd)
        if fd is not None:
            self.state.ring_used = 1    # its other owner may have registered zones
        n = self.check_extension(KVM_CAP_NR_MEMSLOTS)
        self.max_slots = n if n > 0 else 32
        self.has_sync_regs = self.check_extension(KVM_CAP_SYNC_REGS) & KVM_SYNC_X86_REGS != 0

    cdef int require_open(self) except -1:
        if self.forkgen != kvmsys_fork_generation:
            raise StateError("this VM belongs to the parent process (this is a fork child)")
        if self.fd < 0:
            raise StateError("the VM is closed")
        return 0

    cdef long vm_ioctl(self, unsigned long req, void *arg, str op) except -1:
        self.require_open()
        return ioctl_checked(self.fd, req, arg, op)

    cdef long cap(self, long cap_) except -1:
        # KVM_CHECK_EXTENSION on the VM without the Python layer's check_extension
        # (which takes names): no Python code runs (see _WeakRefs)
        return ioctl_checked(self.fd, KVM_CHECK_EXTENSION, <void *>cap_, "KVM_CHECK_EXTENSION")

    cdef long require_cap(self, long cap_, str name, str needed_for) except -1:
        # The VM capability's value (through check_extension), or CapabilityError
        # naming it and what needs it
        cdef long n = self.check_extension(cap_)
        if n <= 0:
            from kvmsys.errors import CapabilityError
            raise CapabilityError(name, needed_for)
        return n

    @property
    def default_handler(self):
        """Called with IO/MMIO/MSR exits no handler range took (None: run() returns them);
        an AccessOps takes the IO/MMIO ones decoded."""
        return self._default_handler

    @default_handler.setter
    def default_handler(self, fn):
        check_exit_callback(fn, "default_handler", True)
        self._default_handler = fn

    def fileno(self):
        """The VM fd."""
        self.require_open()
        return self.fd

    @property
    def closed(self):
        """True once closed (or inherited by a fork child, where KVM refuses it)."""
        return self.fd < 0

    def __repr__(self):
        if self.fd < 0:
            return f"<{type(self).__name__} closed>"
        mem = sum(ms.size for ms in self.slots.values())
        chip = " split irqchip" if self.split_irqchip else " irqchip" if self.has_irqchip else ""
        return (f"<{type(self).__name__} fd={self.fd} slots={len(self.slots)} ({mem >> 10} KiB) "
                f"vcpus={sorted(self.vcpu_ids)}{chip} handlers={self.state.nhandlers}>")

    def check_extension(self, cap):
        """KVM_CHECK_EXTENSION on the VM fd (answers for this VM)."""
        cdef long cap_ = as_int(cap, "capability number", 0, 0x7fffffff)
        self.require_open()
        return ioctl_checked(self.fd, KVM_CHECK_EXTENSION, <void *>cap_, "KVM_CHECK_EXTENSION")

    # --- memory -----------------------------------------------------------
    def add_memory(self, slot, guest_phys_addr, size, *, bint readonly=False, bint log_dirty=False,
                   source=None, offset=0, bint huge_pages=False, guest_memfd=None, guest_memfd_offset=0):
        """Back [guest_phys_addr, +size) with host memory in *slot*: fresh zeroed memory,
        or the caller's *source* — an fd or file object (a memfd, a regular or hugetlbfs
        file: mapped shared from *offset*, which must cover size bytes) or any writable
        contiguous buffer (its page-aligned address, from *offset*; it stays exported,
        so it cannot be resized, while the slot exists).  *huge_pages*: fresh memory
        from the host's huge pages (MAP_HUGETLB).

        *guest_memfd*: an fd from create_guest_memfd() of this VM (KVM_CAP_GUEST_MEMFD)
        whose pages from *guest_memfd_offset* (page-aligned, inside it) back the slot too
        (KVM_SET_USER_MEMORY_REGION2 with KVM_MEM_GUEST_MEMFD); a guest_memfd created with
        mmap=True can also be the *source*.  Such a slot cannot log dirty pages or change
        (KVM only deletes it).

        Returns a writable zero-copy memoryview of it."""
        return self.add_slot(slot, guest_phys_addr, size, readonly, log_dirty, source, offset, huge_pages,
                             guest_memfd, guest_memfd_offset, guest_memfd is not None)

    def set_user_memory_region2(self, slot, guest_phys_addr, size, *, bint readonly=False,
                                bint log_dirty=False, source=None, offset=0, bint huge_pages=False,
                                guest_memfd=None, guest_memfd_offset=0):
        """add_memory() through KVM_SET_USER_MEMORY_REGION2 (KVM_CAP_USER_MEMORY2), the
        ioctl kvm-ioctls names so: the same checks, the same slot (removed with
        remove_memory()); CapabilityError where the host lacks it."""
        return self.add_slot(slot, guest_phys_addr, size, readonly, log_dirty, source, offset, huge_pages,
                             guest_memfd, guest_memfd_offset, True)

    cdef object add_slot(self, slot, guest_phys_addr, size, bint readonly, bint log_dirty, source, offset,
                         bint huge_pages, guest_memfd, guest_memfd_offset, bint region2):
        self.require_open()
        cdef int slot_ = as_int(slot, "slot", 0, 0x7fffffff)
        cdef uint64_t guest_phys_addr_ = as_u64(guest_phys_addr, "guest-physical address")
        cdef uint64_t size_ = as_u64(size, "memory size")
        cdef uint64_t off = as_u64(offset, "source offset")
        cdef long page = sysconf(_SC_PAGESIZE)
        # messages are formatted only when raised: this runs once per slot, up to ~32k slots
        if slot_ >= self.max_slots:
            raise InvalidArgumentError(f"slot {slot_} is out of range 0..{self.max_slots - 1}")
        if slot_ in self.slots:
            raise InvalidArgumentError(f"slot {slot_} is already in use")
        if size_ == 0:
            raise InvalidArgumentError("memory size must be positive")
        if guest_phys_addr_ % page or size_ % page:
            raise InvalidArgumentError(f"guest address and size must be multiples of the page size ({page})")
        if size_ > (1ULL << 52) or guest_phys_addr_ > (1ULL << 52) - size_:
            raise InvalidArgumentError("memory region exceeds the guest-physical address space")
        # the slots never overlap, so their starts are sorted and unique: only the
        # neighbours of the new range can overlap it (O(log n))
        cdef Py_ssize_t i = bisect_right(self.starts, guest_phys_addr_)
        cdef MemorySlot near
        if i > 0:
            near = self.by_start[i - 1]
            if near.guest_phys_addr + near.size > guest_phys_addr_:
                raise InvalidArgumentError(f"[{guest_phys_addr_:#x}, {guest_phys_addr_ + size_:#x}) overlaps {near!r}")
        if i < len(self.starts):
            near = self.by_start[i]
            if near.guest_phys_addr < guest_phys_addr_ + size_:
                raise InvalidArgumentError(f"[{guest_phys_addr_:#x}, {guest_phys_addr_ + size_:#x}) overlaps {near!r}")
        require(source is not None or off == 0, "an offset needs a source")
        require(source is None or not huge_pages, "huge_pages is for fresh memory; pass a hugetlbfs file as source")
        cdef int gmem = -1
        cdef uint64_t gmem_off = as_u64(guest_memfd_offset, "guest_memfd offset")
        cdef struct_stat st
        if guest_memfd is None:
            require(gmem_off == 0, "a guest_memfd offset needs a guest_memfd")
        else:
            gmem = as_int(guest_memfd, "guest_memfd", 0, 0x7fffffff)
            require(gmem_off % page == 0, f"the guest_memfd offset must be a multiple of the page size ({page})")
            require(not log_dirty, "KVM does not log dirty pages of guest_memfd memory (log_dirty=False)")
            if fstat(gmem, &st) != 0:
                raise InvalidArgumentError(f"guest_memfd {gmem} is not open")
            # (a guest_memfd is a regular file of its size; KVM itself refuses any other fd)
            require(S_ISREG(st.st_mode) and <uint64_t>st.st_size >= gmem_off + size_,
                    f"guest_memfd {gmem} must be a guest_memfd of at least offset + size = "
                    f"{gmem_off + size_:#x} bytes (it has {st.st_size:#x})")
        if region2:
            self.require_cap(KVM_CAP_USER_MEMORY2, "USER_MEMORY2", "KVM_SET_USER_MEMORY_REGION2")
        if gmem >= 0:
            self.require_cap(KVM_CAP_GUEST_MEMFD, "GUEST_MEMFD", "a memory slot backed by a guest_memfd")
        cdef uint32_t flags = KVM_MEM_GUEST_MEMFD if gmem >= 0 else 0
        if readonly:
            self.require_cap(KVM_CAP_READONLY_MEM, "READONLY_MEM", "a read-only memory slot")
            flags |= KVM_MEM_READONLY
        if log_dirty:
            flags |= KVM_MEM_LOG_DIRTY_PAGES
        cdef MemorySlot ms = MemorySlot.__new__(MemorySlot)
        ms.mapping = map_source(source, off, size_, page, huge_pages, f"memory slot {slot_}")
        ms.slot = slot_
        ms.guest_phys_addr = guest_phys_addr_
        ms.size = size_
        ms.flags = flags
        ms.region2 = region2
        ms.guest_memfd_offset = gmem_off
        self.set_region(ms, flags, gmem)
        self.slots[slot_] = ms
        self.starts.insert(i, guest_phys_addr_)
        self.by_start.insert(i, ms)
        return ms.view()

    cdef int set_region(self, MemorySlot ms, uint32_t flags, int gmem=-1, bint delete=False) except -1:
        # KVM_SET_USER_MEMORY_REGION, or ...2 for a slot made with it; *delete*: size 0.
        # The first struct is the second's beginning (the kernel's ABI, checked in
        # kvmsys_native.h), so one is filled in and the other copied from it.
        cdef kvm_userspace_memory_region r
        cdef kvm_userspace_memory_region2 r2
        memset(&r2, 0, sizeof(r2))
        r2.slot = ms.slot
        r2.guest_phys_addr = ms.guest_phys_addr
        if not delete:
            r2.flags = flags
            r2.memory_size = ms.size
            r2.userspace_addr = <uint64_t>ms.mapping.addr
            if gmem >= 0:
                r2.guest_memfd = gmem
                r2.guest_memfd_offset = ms.guest_memfd_offset
        cdef str op = "KVM_SET_USER_MEMORY_REGION2" if ms.region2 else "KVM_SET_USER_MEMORY_REGION"
        if delete:
            op += "(delete)"
        if not ms.region2:
            memcpy(&r, &r2, sizeof(r))
            self.vm_ioctl(KVM_SET_USER_MEMORY_REGION, &r, op)
        else:
            try:
                self.vm_ioctl(KVM_SET_USER_MEMORY_REGION2, &r2, op)
            except KvmOSError as e:
                if gmem >= 0 and e.errno == EINVAL:
                    raise KvmOSError(e.errno, e.op, "the guest_memfd must come from create_guest_memfd() of "
                                     "this VM, and its range must not back another slot") from None
                raise
        if not delete:
            ms.flags = flags
        return 0

    def set_memory_flags(self, slot, *, bint log_dirty):
        """Change a live slot's flags only (same memory, same place): turn dirty logging
        on or off while the guest runs on.  Read-only-ness cannot change (KVM refuses)."""
        self.require_open()
        cdef int slot_ = as_int(slot, "slot", 0, 0x7fffffff)
        require(slot_ in self.slots, f"slot {slot_} is not in use")
        cdef MemorySlot ms = self.slots[slot_]
        require(not ms.flags & KVM_MEM_GUEST_MEMFD, f"slot {slot_} is backed by a guest_memfd: KVM only deletes such a slot")
        cdef uint32_t flags = ms.flags & ~KVM_MEM_LOG_DIRTY_PAGES
        self.set_region(ms, flags | (KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0))

    def remove_memory(self, slot):
        """Delete a memory slot.  Views of it stay valid (host memory outlives the slot)."""
        self.require_open()
        cdef int slot_ = as_int(slot, "slot", 0, 0x7fffffff)
        cdef MemorySlot ms = self._slot(slot_)
        self.set_region(ms, 0, -1, True)
        del self.slots[slot_]
        cdef Py_ssize_t i = bisect_right(self.starts, ms.guest_phys_addr) - 1
        del self.starts[i]
        del self.by_start[i]

    cdef MemorySlot _slot(self, int slot):
        ms = self.slots.get(slot)
        if ms is None:
            raise InvalidArgumentError(f"slot {slot} is not in use")
        return ms

    @property
    def memory_slots(self):
        """The memory slots, by slot number."""
        return dict(self.slots)

    def memory(self, slot=0):
        """Writable zero-copy memoryview of one slot."""
        self.require_open()
        return self._slot(as_int(slot, "slot", 0, 0x7fffffff)).view()

    cdef MemorySlot _find(self, uint64_t gpa, uint64_t length):
        cdef Py_ssize_t i = bisect_right(self.starts, gpa) - 1
        cdef MemorySlot ms
        if i >= 0:
            ms = self.by_start[i]
            if gpa - ms.guest_phys_addr <= ms.size and length <= ms.size - (gpa - ms.guest_phys_addr):
                return ms
        raise InvalidArgumentError(
            f"guest-physical range [{gpa:#x}, {gpa + length:#x}) is not inside one memory slot")

    def read(self, gpa, length):
        """Copy *length* bytes of guest memory at *gpa* (bounds-checked)."""
        self.require_open()
        cdef uint64_t gpa_ = as_u64(gpa, "guest-physical address")
        cdef uint64_t length_ = as_u64(length, "length")
        cdef MemorySlot ms = self._find(gpa_, length_)
        ms.mapping.check_range(gpa_ - ms.guest_phys_addr, length_)
        return (<char *>ms.mapping.addr)[gpa_ - ms.guest_phys_addr:gpa_ - ms.guest_phys_addr + length_]

    def write(self, gpa, data):
        """Copy *data* (bytes-like) into guest memory at *gpa* (bounds-checked)."""
        self.require_open()
        cdef uint64_t gpa_ = as_u64(gpa, "guest-physical address")
        cdef const uint8_t[::1] src
        try:
            src = memoryview(data).cast("B")
        except (TypeError, ValueError):
            raise ArgumentTypeError(f"write takes a bytes-like object, not {type(data).__name__}") from None
        cdef uint64_t n = src.shape[0]
        cdef MemorySlot ms = self._find(gpa_, n)
        ms.mapping.check_range(gpa_ - ms.guest_phys_addr, n)
        if n:
            memcpy(ms.mapping.addr + (gpa_ - ms.guest_phys_addr), &src[0], n)

    def get_dirty_log(self, slot):
        """KVM_GET_DIRTY_LOG: one bit per page of the slot (bytes, little-endian bit order)."""
        self.require_open()
        cdef int slot_ = as_int(slot, "slot", 0, 0x7fffffff)
        cdef MemorySlot ms = self._slot(slot_)
        require(ms.flags & KVM_MEM_LOG_DIRTY_PAGES, f"slot {slot_} was not added with log_dirty=True")
        cdef uint64_t pages = ms.size // sysconf(_SC_PAGESIZE)
        cdef bytearray bitmap = bytearray(((pages + 63) // 64) * 8)
        cdef kvm_dirty_log log
        memset(&log, 0, sizeof(log))
        log.slot = slot_
        log.dirty_bitmap = <char *>bitmap
        self.vm_ioctl(KVM_GET_DIRTY_LOG, &log, "KVM_GET_DIRTY_LOG")
        return bytes(bitmap)

    def clear_dirty_log(self, slot, first_page=0, num_pages=None, bitmap=None):
        """KVM_CLEAR_DIRTY_LOG (manual dirty-log protection, enabled with
        enable_cap(MANUAL_DIRTY_LOG_PROTECT2)): clear and write-protect again the pages of
        [first_page, +num_pages) whose bit is set in *bitmap* (default: all of them).
        first_page must be a multiple of 64, num_pages too unless it reaches the slot's end."""
        self.require_open()
        cdef int slot_ = as_int(slot, "slot", 0, 0x7fffffff)
        require(slot_ in self.slots, f"slot {slot_} is not in use")
        cdef MemorySlot ms = self.slots[slot_]
        require(ms.flags & KVM_MEM_LOG_DIRTY_PAGES, f"slot {slot_} does not log dirty pages")
        cdef uint64_t pages = ms.size // sysconf(_SC_PAGESIZE)
        cdef uint64_t first = as_u64(first_page, "first page")
        cdef uint64_t n = pages - first if num_pages is None and first <= pages else as_u64(num_pages, "page count")
        require(first % 64 == 0 and first < pages and 0 < n <= pages - first and
                (n % 64 == 0 or first + n == pages),
                f"pages [{first}, +{n}) of a {pages}-page slot: first_page and num_pages must be "
                "multiples of 64 (num_pages may end the slot)")
        cdef bytes bm = b"\xff" * ((n + 7) // 8) if bitmap is None else as_blob(bitmap, "dirty bitmap")
        require(<uint64_t>len(bm) * 8 >= n, f"a bitmap of {len(bm)} bytes cannot cover {n} pages")
        cdef kvm_clear_dirty_log c
        memset(&c, 0, sizeof(c))
        c.slot = slot_
        c.first_page = first
        c.num_pages = <uint32_t>n
        c.dirty_bitmap = <char *>bm
        self.vm_ioctl(KVM_CLEAR_DIRTY_LOG, &c, "KVM_CLEAR_DIRTY_LOG")

    def enable_dirty_ring(self, size):
        """KVM_CAP_DIRTY_LOG_RING: each vCPU created afterwards logs the pages it dirties
        (in slots with log_dirty) in a ring of *size* bytes (a power of two, at least a
        page; 16 bytes per entry) instead of the bitmap; harvest with
        vcpu.harvest_dirty_ring(), then reset_dirty_rings().  Before any vCPU."""
        require(not self.vcpu_ids, "the dirty ring must be enabled before the first vCPU")
        cdef uint32_t size_ = as_u32(size, "dirty ring size")
        cdef long limit = self.require_cap(KVM_CAP_DIRTY_LOG_RING, "DIRTY_LOG_RING", "a dirty ring")
        require(size_ >= <uint32_t>sysconf(_SC_PAGESIZE) and size_ & (size_ - 1) == 0 and size_ <= limit,
                f"the dirty ring size must be a power of two between a page and {limit} bytes")
        cdef kvm_enable_cap c
        fill_enable_cap(&c, KVM_CAP_DIRTY_LOG_RING, 0, (size_,))
        self.vm_ioctl(KVM_ENABLE_CAP, &c, "KVM_ENABLE_CAP(DIRTY_LOG_RING)")
        self.dirty_ring_size = size_

    def reset_dirty_rings(self):
        """KVM_RESET_DIRTY_RINGS: write-protect again the pages harvested from every vCPU's
        ring (so the next write logs them again); returns how many."""
        self.require_open()
        return ioctl_checked(self.fd, KVM_RESET_DIRTY_RINGS, NULL, "KVM_RESET_DIRTY_RINGS")

    # --- platform and interrupts ------------------------------------------
    def set_tss_addr(self, addr):
        """KVM_SET_TSS_ADDR: three pages the VT-x real-mode emulation needs (below 4 GiB)."""
        cdef uint64_t addr_ = as_uint(addr, "TSS address", (1ULL << 32) - 3 * 4096)
        self.require_open()
        ioctl_checked(self.fd, KVM_SET_TSS_ADDR, <void *><unsigned long>addr_, "KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, addr):
        """KVM_SET_IDENTITY_MAP_ADDR: one page for the VT-x identity map (below 4 GiB)."""
        cdef uint64_t addr_ = as_uint(addr, "identity map address", (1ULL << 32) - 4096)
        require(addr_ % 4096 == 0, "the identity map address must be a page below 4 GiB")
        cdef uint64_t a = addr_
        self.vm_ioctl(KVM_SET_IDENTITY_MAP_ADDR, &a, "KVM_SET_IDENTITY_MAP_ADDR")

    def create_irqchip(self):
        """KVM_CREATE_IRQCHIP: in-kernel PIC, IOAPIC and local APICs (before any vCPU)."""
        require(not self.vcpu_ids, "the irqchip must be created before the first vCPU")
        self.vm_ioctl(KVM_CREATE_IRQCHIP, NULL, "KVM_CREATE_IRQCHIP")
        self.has_irqchip = 1

    def create_pit2(self, flags=0):
        """KVM_CREATE_PIT2: in-kernel i8254 timer (needs the irqchip)."""
        cdef kvm_pit_config c
        memset(&c, 0, sizeof(c))
        c.flags = as_u32(flags, "PIT flags")
        self.vm_ioctl(KVM_CREATE_PIT2, &c, "KVM_CREATE_PIT2")

    def irq_line(self, irq, level):
        """KVM_IRQ_LINE: set an interrupt line of the in-kernel irqchip high (1) or low (0)."""
        cdef uint32_t irq_ = <uint32_t>as_uint(irq, "irq", 1023)
        cdef int level_ = <int>as_uint(level, "level", 1)
        require(self.has_irqchip, "irq_line needs the in-kernel irqchip (create_irqchip)")
        cdef kvm_irq_level l
        memset(&l, 0, sizeof(l))
        l.irq = irq_
        l.level = level_
        self.vm_ioctl(KVM_IRQ_LINE, &l, "KVM_IRQ_LINE")

    def create_split_irqchip(self, ioapic_pins=24):
        """KVM_CAP_SPLIT_IRQCHIP: local APICs in the kernel, PIC and IOAPIC in user space;
        GSIs below *ioapic_pins* are the user-space IOAPIC's (their routes are MSIs, and a
        guest's EOI of a level-triggered one exits as IOAPIC_EOI).  Before any vCPU."""
        cdef uint32_t ioapic_pins_ = as_uint(ioapic_pins, "IOAPIC pins", KVM_IOAPIC_NUM_PINS * 16)
        require(not self.vcpu_ids, "the split irqchip must be enabled before the first vCPU")
        require(not self.has_irqchip, "the VM already has an irqchip")
        self.require_cap(KVM_CAP_SPLIT_IRQCHIP, "SPLIT_IRQCHIP", "a split irqchip")
        cdef kvm_enable_cap c
        memset(&c, 0, sizeof(c))
        c.cap = KVM_CAP_SPLIT_IRQCHIP
        c.args[0] = ioapic_pins_
        self.vm_ioctl(KVM_ENABLE_CAP, &c, "KVM_ENABLE_CAP(SPLIT_IRQCHIP)")
        self.has_irqchip = 1
        self.split_irqchip = 1

    def irq_line_status(self, irq, level):
        """KVM_IRQ_LINE_STATUS: like irq_line, and returns the kernel's status: > 0 delivered
        (to that many CPUs), 0 masked or coalesced, < 0 an error."""
        cdef uint32_t irq_ = <uint32_t>as_uint(irq, "irq", 4095)
        cdef int level_ = <int>as_uint(level, "level", 1)
        require(self.has_irqchip, "irq_line_status needs an in-kernel irqchip")
        cdef kvm_irq_level l
        memset(&l, 0, sizeof(l))
        l.irq = irq_
        l.level = level_
        self.vm_ioctl(KVM_IRQ_LINE_STATUS, &l, "KVM_IRQ_LINE_STATUS")
        return <int32_t>l.irq          # the union's `status` member, written back

    def set_gsi_routing(self, routes):
        """KVM_SET_GSI_ROUTING: the whole table at once, replacing the default one.  Each
        route is (gsi, KVM_IRQ_ROUTING_IRQCHIP, irqchip, pin) or (gsi,
        KVM_IRQ_ROUTING_MSI, address_lo, address_hi, data[, devid]); see kvmsys.routing."""
        require(self.has_irqchip, "GSI routing needs an in-kernel irqchip")
        cdef list rs = as_list(routes, "GSI routes")
        cdef long limit = self.check_extension(KVM_CAP_IRQ_ROUTING)
        require(len(rs) <= limit, f"at most {limit} GSI routes, got {len(rs)}")
        cdef kvm_irq_routing *t = <kvm_irq_routing *>calloc(1, sizeof(kvm_irq_routing) +
                                                            max(len(rs), 1) * sizeof(kvm_irq_routing_entry))
        if t == NULL:
            raise MemoryError()
        cdef kvm_irq_routing_entry *e = <kvm_irq_routing_entry *>(<char *>t + sizeof(kvm_irq_routing))
        try:
            t.nr = len(rs)
            for i, r in enumerate(rs):
                require(isinstance(r, tuple) and len(r) >= 2, f"route {i} must be a tuple (gsi, type, ...)")
                e[i].gsi = as_int(r[0], f"route {i} GSI", 0, limit - 1 if limit > 0 else 0)
                kind = r[1]
                if kind == KVM_IRQ_ROUTING_IRQCHIP:
                    require(len(r) == 4, f"route {i}: (gsi, IRQCHIP, irqchip, pin)")
                    e[i].type = KVM_IRQ_ROUTING_IRQCHIP
                    e[i].u.irqchip.irqchip = as_int(r[2], f"route {i} irqchip", 0, KVM_NR_IRQCHIPS - 1)
                    e[i].u.irqchip.pin = as_int(r[3], f"route {i} pin", 0, KVM_IOAPIC_NUM_PINS - 1)
                elif kind == KVM_IRQ_ROUTING_MSI:
                    require(len(r) in (5, 6), f"route {i}: (gsi, MSI, address_lo, address_hi, data[, devid])")
                    e[i].type = KVM_IRQ_ROUTING_MSI
                    e[i].u.msi.address_lo = as_u32(r[2], f"route {i} address_lo")
                    e[i].u.msi.address_hi = as_u32(r[3], f"route {i} address_hi")
                    e[i].u.msi.data = as_u32(r[4], f"route {i} data")
                    if len(r) == 6 and r[5] is not None:
                        e[i].flags = KVM_MSI_VALID_DEVID
                        e[i].u.msi.devid = as_u32(r[5], f"route {i} devid")
                else:
                    raise InvalidArgumentError(f"route {i}: unknown routing type {kind!r}")
            self.vm_ioctl(KVM_SET_GSI_ROUTING, t, "KVM_SET_GSI_ROUTING")
        finally:
            free(t)

    def signal_msi(self, address_lo, data, address_hi=0, flags=0, devid=0):
        """KVM_SIGNAL_MSI: inject one MSI.  Returns 1 if delivered, 0 if the guest blocked it."""
        cdef kvm_msi m
        memset(&m, 0, sizeof(m))
        m.address_lo = as_u32(address_lo, "MSI address_lo")
        m.address_hi = as_u32(address_hi, "MSI address_hi")
        m.data = as_u32(data, "MSI data")
        m.flags = as_u32(flags, "MSI flags")
        m.devid = as_u32(devid, "MSI devid")
        require(self.has_irqchip, "signal_msi needs the in-kernel irqchip (create_irqchip)")
        return self.vm_ioctl(KVM_SIGNAL_MSI, &m, "KVM_SIGNAL_MSI")

    def ioeventfd(self, fd, addr, length, *, datamatch=None, bint pio=False,
                  bint deassign=False):
        """KVM_IOEVENTFD: a guest write of *length* bytes at *addr* signals eventfd *fd*."""
        cdef int fd_ = as_int(fd, "fd", 0, 0x7fffffff)
        cdef uint64_t addr_ = as_u64(addr, "address")
        cdef uint32_t length_ = as_u32(length, "length")
        require(length_ in (0, 1, 2, 4, 8), "length must be 0, 1, 2, 4 or 8")
        require(not pio or addr_ <= 0xffff, "a PIO address must be a 16-bit port")
        cdef kvm_ioeventfd e
        memset(&e, 0, sizeof(e))
        e.addr = addr_
        e.len = length_
        e.fd = fd_
        if datamatch is not None:
            e.datamatch = as_u64(datamatch, "datamatch")
            e.flags |= KVM_IOEVENTFD_FLAG_DATAMATCH
        if pio:
            e.flags |= KVM_IOEVENTFD_FLAG_PIO
        if deassign:
            e.flags |= KVM_IOEVENTFD_FLAG_DEASSIGN
        self.vm_ioctl(KVM_IOEVENTFD, &e, "KVM_IOEVENTFD")

    def irqfd(self, fd, gsi, *, resamplefd=-1, bint deassign=False):
        """KVM_IRQFD: a write to eventfd *fd* raises interrupt *gsi* (needs the irqchip)."""
        cdef int fd_ = as_int(fd, "fd", 0, 0x7fffffff)
        cdef uint32_t gsi_ = as_u32(gsi, "gsi")
        cdef int rfd = as_int(resamplefd, "resamplefd", -1, 0x7fffffff)
        require(self.has_irqchip, "irqfd needs the in-kernel irqchip (create_irqchip)")
        cdef kvm_irqfd q
        memset(&q, 0, sizeof(q))
        q.fd = fd_
        q.gsi = gsi_
        if deassign:
            q.flags |= KVM_IRQFD_FLAG_DEASSIGN
        if rfd >= 0:
            q.flags |= KVM_IRQFD_FLAG_RESAMPLE
            q.resamplefd = rfd
        self.vm_ioctl(KVM_IRQFD, &q, "KVM_IRQFD")

    cdef int map_ring(self, int vcpu_fd) except -1:
        # The ring is the VM's, one page shown at KVM_COALESCED_MMIO_PAGE_OFFSET of
        # every vCPU fd: map it once, from the first vCPU, for the VM's life (the
        # mapping keeps that vCPU's file open, so closing the vCPU leaves it valid).
        cdef long page = sysconf(_SC_PAGESIZE)
        if self.ring_page is not None or self.cap(KVM_CAP_COALESCED_MMIO) <= 0 or \
                (KVM_COALESCED_MMIO_PAGE_OFFSET + 1) * page > <long>self.mmap_size:
            return 0
        cdef void *addr = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu_fd,
                               KVM_COALESCED_MMIO_PAGE_OFFSET * page)
        if addr == MAP_FAILED:
            raise_os(errno, "mmap(coalesced ring)")
        self.ring_page = Mapping.wrap(addr, page, "the coalesced ring")   # MADV_DONTFORK
        pthread_mutex_lock(&self.state.ring_lock)
        self.state.ring_max = (page - sizeof(kvm_coalesced_mmio_ring)) // sizeof(kvm_coalesced_mmio)
        self.state.ring = <kvm_coalesced_mmio_ring *>addr
        pthread_mutex_unlock(&self.state.ring_lock)
        return 0

    def register_coalesced(self, addr, size, *, bint pio=False, bint unregister=False):
        """KVM_(UN)REGISTER_COALESCED_MMIO: guest writes to the zone are batched in a ring
        that the run loop drains at the next exit, each write through the handler of its
        range in order (an EXIT range stops the run, a PYTHON range gets a CoalescedExit),
        with no exit per write.  Registering returns ().

        Unregistering drains the ring before it returns, in the calling thread: once the
        zone is gone from KVM (no new write lands in the ring), every entry still in the
        ring (of any zone) is taken, in order, under the lock vCPUs drain it with.  A write
        whose range is handled in C (SINK, CONST, IGNORE, the IGNORE default) is applied
        at once, as a run would; one whose range is PYTHON (callback or not, or the PYTHON
        default) or EXIT cannot be delivered outside run(): it is returned instead, and
        no run() ever sees it.  Returns those writes in ring order, a tuple of
        CoalescedWrite(space, address, data); the caller delivers them (an EXIT write is
        the guest asking to stop, with status (value << 1) | 1).  An entry a vCPU of
        another thread took from the ring just before (all come before these in the
        ring) stays its run's to deliver, possibly after the caller got these.  Entries
        taken here count in coalesced_flushed, not in any vCPU's stats().  Unregistering
        a zone that is not registered (the same addr, size and pio) is an
        InvalidArgumentError.  KVM unregisters every zone of the kind (MMIO or PIO) that
        contains the range, so a zone around an unregistered one is gone too."""
        cdef uint64_t addr_ = as_u64(addr, "zone address")
        cdef uint32_t size_ = as_u32(size, "zone size")
        require(size_ > 0, "zone size must be positive")
        require(addr_ + size_ > addr_, "the zone wraps past the end of the address space")
        require(not pio or addr_ + size_ <= 0x10000, "a PIO zone must lie within ports 0..0xffff")
        cap = KVM_CAP_COALESCED_PIO if pio else KVM_CAP_COALESCED_MMIO
        self.require_cap(cap, "COALESCED_PIO" if pio else "COALESCED_MMIO", "a coalesced zone")
        cdef kvm_coalesced_mmio_zone z
        memset(&z, 0, sizeof(z))
        z.addr = addr_
        z.size = size_
        z.pio = 1 if pio else 0
        key = (addr_, size_, bool(pio))
        if not unregister:
            kvmsys_store_int(&self.state.ring_used, 1)     # before any write can land in the ring
            self.vm_ioctl(KVM_REGISTER_COALESCED_MMIO, &z, "KVM_REGISTER_COALESCED_MMIO")
            self.coalesced_zones.add(key)
            return ()
        require(key in self.coalesced_zones,
                f"no coalesced {'PIO' if pio else 'MMIO'} zone {addr_:#x}+{size_:#x} is registered")
        self.vm_ioctl(KVM_UNREGISTER_COALESCED_MMIO, &z, "KVM_UNREGISTER_COALESCED_MMIO")
        # KVM drops every zone of that kind that contains the range, not only the
        # one that equals it: forget them all, as KVM does
        for zone in [k for k in self.coalesced_zones if k[2] == key[2] and k[0] <= addr_ and
                     addr_ + size_ <= k[0] + k[1]]:
            self.coalesced_zones.discard(zone)
        return self.flush_coalesced()

    cdef tuple flush_coalesced(self):
        # The ring's entries now, in order (see register_coalesced): C-handled ones
        # applied, the others returned.
        cdef uint32_t n = 0, i
        cdef uint32_t cap = (sysconf(_SC_PAGESIZE) - sizeof(kvm_coalesced_mmio_ring)) // sizeof(kvm_coalesced_mmio)
        cdef int r
        cdef kvm_coalesced_mmio *out = <kvm_coalesced_mmio *>calloc(cap, sizeof(kvm_coalesced_mmio))
        if out == NULL:
            raise MemoryError()
        try:
            with nogil:         # the lock may be held by a vCPU draining the ring
                r = flush_ring(self.state, out, cap, &n)
            writes = []
            for i in range(n):
                writes.append(CoalescedWrite(SPACE_PIO if out[i].pio else SPACE_MMIO, out[i].phys_addr,
                                             (<char *>out[i].data)[:out[i].len]))
        finally:
            free(out)
        if r < 0:
            raise_os(-r, "draining the coalesced ring", "the ring holds an index out of range")
        return tuple(writes)

    def enable_cap(self, cap, flags=0, args=()):
        """KVM_ENABLE_CAP on the VM."""
        cdef kvm_enable_cap c
        fill_enable_cap(&c, cap, flags, args)
        self.vm_ioctl(KVM_ENABLE_CAP, &c, "KVM_ENABLE_CAP")

    def create_guest_memfd(self, size, *, bint mmap=False, bint init_shared=False):
        """KVM_CREATE_GUEST_MEMFD: an fd (yours to close; close-on-exec) of *size* bytes
        (page-aligned) of guest memory KVM keeps for this VM, to back slots through
        add_memory(guest_memfd=...).  *mmap*: the host may map it too
        (GUEST_MEMFD_FLAG_MMAP), *init_shared*: its pages start shared with the host
        (GUEST_MEMFD_FLAG_INIT_SHARED); KVM_CAP_GUEST_MEMFD_FLAGS says which a VM takes.
        CapabilityError where the host lacks guest_memfd or a flag."""
        self.require_open()
        cdef uint64_t size_ = as_u64(size, "guest_memfd size")
        cdef long page = sysconf(_SC_PAGESIZE)
        require(size_ > 0 and size_ % page == 0, f"guest_memfd size must be a positive multiple of the page "
                f"size ({page}), not {size_:#x}")
        cdef kvm_create_guest_memfd g
        memset(&g, 0, sizeof(g))
        g.size = size_
        g.flags = (GUEST_MEMFD_FLAG_MMAP if mmap else 0) | (GUEST_MEMFD_FLAG_INIT_SHARED if init_shared else 0)
        self.require_cap(KVM_CAP_GUEST_MEMFD, "GUEST_MEMFD", "KVM_CREATE_GUEST_MEMFD")
        cdef long supported = self.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS)
        if g.flags & ~<uint64_t>(supported if supported > 0 else 0):
            from kvmsys.errors import CapabilityError
            raise CapabilityError("GUEST_MEMFD_FLAGS", f"a guest_memfd with flags {g.flags:#x} (this VM takes "
                                  f"{max(supported, 0):#x}: mmap {GUEST_MEMFD_FLAG_MMAP:#x}, init_shared "
                                  f"{GUEST_MEMFD_FLAG_INIT_SHARED:#x})")
        cdef int fd = <int>self.vm_ioctl(KVM_CREATE_GUEST_MEMFD, &g, "KVM_CREATE_GUEST_MEMFD")
        _os.set_inheritable(fd, False)      # KVM makes it inheritable; every other fd of ours is not
        return fd

    def create_device(self, type_, bint test=False):
        """KVM_CREATE_DEVICE: a device fd (DeviceCore) of KVM_DEV_TYPE_* *type_*; with
        *test*, only whether this VM can create one (True/False), creating nothing."""
        cdef kvm_create_device d
        memset(&d, 0, sizeof(d))
        d.type = as_u32(type_, "device type")
        d.flags = KVM_CREATE_DEVICE_TEST if test else 0
        self.require_open()
        if ioctl_nogil(self.fd, KVM_CREATE_DEVICE, &d) < 0:
            if test and errno == ENODEV:
                return False
            raise_os(errno, "KVM_CREATE_DEVICE")
        if test:
            return True
        cdef DeviceCore dev = DeviceCore.__new__(DeviceCore)
        dev.fd = d.fd
        dev.vm = self
        dev.type = d.type
        return dev

    def set_msr_filter(self, ranges, bint default_deny=False):
        """KVM_X86_SET_MSR_FILTER: *ranges* of (flags, base, nmsrs, bitmap); a 0 bit in a
        range's bitmap denies the accesses in its flags (KVM_MSR_FILTER_READ=1, WRITE=2),
        which then exit to user space if KVM_CAP_X86_USER_SPACE_MSR asks for FILTER exits.
        A new filter replaces the old; no ranges and default allow turn filtering off."""
        cdef list rs = as_list(ranges, "MSR filter ranges")
        require(len(rs) <= KVM_MSR_FILTER_MAX_RANGES,
                f"at most {KVM_MSR_FILTER_MAX_RANGES} MSR filter ranges, got {len(rs)}")
        cdef kvm_msr_filter f
        memset(&f, 0, sizeof(f))
        f.flags = KVM_MSR_FILTER_DEFAULT_DENY if default_deny else KVM_MSR_FILTER_DEFAULT_ALLOW
        cdef list keep = []         # the bitmaps stay alive through the ioctl
        cdef bytes bm
        for i, r in enumerate(rs):
            require(isinstance(r, tuple) and len(r) == 4, f"MSR filter range {i} must be (flags, base, nmsrs, bitmap)")
            flags, base, nmsrs, bitmap = r
            require(isinstance(flags, int) and flags != 0 and
                    flags & ~(KVM_MSR_FILTER_READ | KVM_MSR_FILTER_WRITE) == 0,
                    f"MSR filter range {i}: flags must be READ (1), WRITE (2) or both")
            base = as_u32(base, "MSR filter base")
            nmsrs = as_int(nmsrs, "MSR filter count", 1, KVM_MSR_FILTER_MAX_BITMAP_SIZE * 8)
            bm = as_blob(bitmap, "MSR filter bitmap")
            require(len(bm) * 8 >= nmsrs, f"MSR filter range {i}: a bitmap of {len(bm)} bytes "
                    f"cannot cover {nmsrs} MSRs")
            keep.append(bm)
            f.ranges[i].flags = flags
            f.ranges[i].base = base
            f.ranges[i].nmsrs = nmsrs
            f.ranges[i].bitmap = <uint8_t *><char *>bm
        self.vm_ioctl(KVM_X86_SET_MSR_FILTER, &f, "KVM_X86_SET_MSR_FILTER")

    # --- device state blobs (the raw kernel structs), for save and restore ----
    cdef bytes get_vm_blob(self, unsigned long req, void *buf, size_t size, str op):
        self.vm_ioctl(req, buf, op)
        return (<char *>buf)[:size]

    def get_irqchip(self, chip_id):
        """KVM_GET_IRQCHIP: chip 0 = PIC master, 1 = PIC slave, 2 = IOAPIC (raw struct kvm_irqchip)."""
        cdef uint32_t chip_id_ = as_u32(chip_id, "irqchip id")
        require(self.has_irqchip, "get_irqchip needs the in-kernel irqchip (create_irqchip)")
        require(chip_id_ in (KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC),
                f"unknown irqchip {chip_id_}")
        cdef kvm_irqchip c
        memset(&c, 0, sizeof(c))
        c.chip_id = chip_id_
        return self.get_vm_blob(KVM_GET_IRQCHIP, &c, sizeof(c), "KVM_GET_IRQCHIP")

    def set_irqchip(self, data):
        """KVM_SET_IRQCHIP from get_irqchip()'s bytes (the chip id is inside)."""
        require(self.has_irqchip, "set_irqchip needs the in-kernel irqchip (create_irqchip)")
        cdef bytearray buf = bytearray(as_blob(data, "set_irqchip"))
        require(<size_t>len(buf) == sizeof(kvm_irqchip), f"KVM_SET_IRQCHIP takes {sizeof(kvm_irqchip)} bytes")
        self.vm_ioctl(KVM_SET_IRQCHIP, <char *>buf, "KVM_SET_IRQCHIP")

    def get_pit2(self):
        """KVM_GET_PIT2 (raw struct kvm_pit_state2)."""
        cdef kvm_pit_state2 p
        return self.get_vm_blob(KVM_GET_PIT2, &p, sizeof(p), "KVM_GET_PIT2")

    def set_pit2(self, data):
        """KVM_SET_PIT2: bytes from get_pit2()."""
        cdef bytearray buf = bytearray(as_blob(data, "set_pit2"))
        require(<size_t>len(buf) == sizeof(kvm_pit_state2), f"KVM_SET_PIT2 takes {sizeof(kvm_pit_state2)} bytes")
        self.vm_ioctl(KVM_SET_PIT2, <char *>buf, "KVM_SET_PIT2")

    def get_clock(self):
        """KVM_GET_CLOCK: the guest's kvmclock (raw struct kvm_clock_data)."""
        cdef kvm_clock_data c
        memset(&c, 0, sizeof(c))
        return self.get_vm_blob(KVM_GET_CLOCK, &c, sizeof(c), "KVM_GET_CLOCK")

    def set_clock(self, data):
        """KVM_SET_CLOCK: bytes from get_clock() (struct kvm_clock_data)."""
        cdef bytearray buf = bytearray(as_blob(data, "set_clock"))
        require(<size_t>len(buf) == sizeof(kvm_clock_data), f"KVM_SET_CLOCK takes {sizeof(kvm_clock_data)} bytes")
        (<kvm_clock_data *><char *>buf).flags = 0      # only the clock value is settable everywhere
        self.vm_ioctl(KVM_SET_CLOCK, <char *>buf, "KVM_SET_CLOCK")

    # --- fast handlers (used by the run loop) ------------------------------
    def add_handler(self, space, start, end, kind, value=0, callback=None, *, read=None, write=None):
        """Route exits at [start, end) of *space* (kvmsys.Space: PIO, MMIO, or MSR by index) to a handler kind.

        Returns the handler's index.  Where ranges overlap the latest handler wins, so a
        handler added later overrides (replaces) part of an earlier one; remove_handler()
        takes it away again.  A SINK handler's reads return *value* (0 by default).
        A PYTHON handler's *callback* is called with the exit; for PIO and MMIO it may be
        an AccessOps instead (called with the decoded access), or given as *read*/*write*."""
        cdef int space_ = as_int(space, "space", 0, 2)
        cdef uint64_t start_ = as_u64(start, "start")
        cdef uint64_t end_ = as_u64(end, "end")
        cdef int kind_ = as_int(kind, "handler kind", 0, 0x7fffffff)
        cdef uint64_t value_ = as_u64(value, "value")
        require(space_ in (SPACE_PIO, SPACE_MMIO, SPACE_MSR), "space must be 0 (PIO), 1 (MMIO) or 2 (MSR)")
        require(kind_ in (H_PYTHON, H_SINK, H_CONST, H_IGNORE, H_EXIT), f"unknown handler kind {kind_}")
        require(space_ != SPACE_MSR or end_ <= (<uint64_t>1 << 32), "an MSR range must lie within indices 0..0xffffffff")
        require(start_ < end_, "handler range is empty")
        require(space_ != SPACE_PIO or end_ <= 0x10000, "a PIO range must lie within ports 0..0xffff")
        cdef bint has_ops = read is not None or write is not None
        require(not has_ops or callback is None, "a handler takes a callback or read=/write=, not both")
        if has_ops:
            callback = AccessOps(read, write)
        require(callback is None or kind_ == H_PYTHON, "only a Python handler takes a callback")
        check_exit_callback(callback, "callback", True)
        require(type(callback) is not AccessOps or space_ != SPACE_MSR, "AccessOps serve PIO and MMIO, not MSRs")
        self.require_open()
        cdef int n = self.state.nhandlers
        if n >= MAX_HANDLERS:
            raise InvalidArgumentError(f"at most {MAX_HANDLERS} handlers per VM")
        cdef handler_t *h = &self.state.handlers[n]
        h.space = space_
        h.kind = kind_
        h.start = start_
        h.end = end_
        h.value = value_
        self.py_handlers.append(callback)
        kvmsys_store_int(&self.state.nhandlers, n + 1)   # publish after the entry is complete
        return n

    def remove_handler(self, index):
        """Remove handler *index* (as add_handler returned it): its range falls through to
        earlier handlers or the default.  Indexes are never reused: at most MAX_HANDLERS
        handlers are ever added to a VM."""
        cdef int index_ = as_int(index, "handler index", -0x80000000, 0x7fffffff)
        self.require_open()
        require(0 <= index_ < self.state.nhandlers and self.state.handlers[index_].space >= 0,
                f"no handler {index_}")
        kvmsys_store_int(&self.state.handlers[index_].space, -1)   # matches nothing from now on
        self.py_handlers[index_] = None

    def handlers(self):
        """The handler table by index: list of (space, start, end, kind, value, callback);
        a removed handler's space is -1, and a handler added with read=/write= has their
        AccessOps as callback."""
        cdef int i
        return [(self.state.handlers[i].space, self.state.handlers[i].start, self.state.handlers[i].end,
                 self.state.handlers[i].kind, self.state.handlers[i].value, self.py_handlers[i])
                for i in range(self.state.nhandlers)]

    def set_default(self, space, kind):
        """What happens to an access no handler covers: H_PYTHON (return it) or H_IGNORE."""
        cdef int space_ = as_int(space, "space", -0x80000000, 0x7fffffff)
        cdef int kind_ = as_int(kind, "handler kind", -0x80000000, 0x7fffffff)
        require(space_ in (SPACE_PIO, SPACE_MMIO, SPACE_MSR), "space must be 0 (PIO), 1 (MMIO) or 2 (MSR)")
        require(kind_ in (H_PYTHON, H_IGNORE), "the default is H_PYTHON or H_IGNORE")
        self.require_open()
        self.state.default_kind[space_] = kind_

    def set_hlt_action(self, kind, callback=None):
        """HLT exits: H_PYTHON (return them from run(), or with *callback*: call it with the
        HltExit, as a Python handler of an access is called, and go on unless it returns a
        true value), H_IGNORE (re-enter at once) or H_EXIT (stop the run)."""
        cdef int kind_ = as_int(kind, "HLT action", -0x80000000, 0x7fffffff)
        require(kind_ in (H_PYTHON, H_IGNORE, H_EXIT), "HLT action is H_PYTHON, H_IGNORE or H_EXIT")
        require(callback is None or kind_ == H_PYTHON, "only the PYTHON HLT action takes a callback")
        check_exit_callback(callback, "callback", False)     # (HLT has no access to decode)
        self.require_open()
        self._hlt_handler = callback
        self.state.hlt_action = kind_

    @property
    def hlt_handler(self):
        """The callback HLT exits go to (set_hlt_action(PYTHON, callback)), or None."""
        return self._hlt_handler

    def console(self, bint clear=False, *, start=0):
        """Bytes collected by sink handlers (serial THR, debugcon) from offset *start* on,
        optionally clearing them all.  A reader that keeps its offset (the length it has
        read so far) copies only what is new; a *start* past the end is refused."""
        cdef size_t start_ = <size_t>as_uint(start, "console start", CONSOLE_MAX)
        if self.forkgen != kvmsys_fork_generation:
            self.require_open()         # its lock may be held by a thread of the parent
        pthread_mutex_lock(&self.state.lock)
        try:
            if start_ > self.state.console_len:
                raise InvalidArgumentError(f"console start {start_} is past its end "
                                           f"({self.state.console_len} bytes)")
            out = (<char *>self.state.console)[start_:self.state.console_len] \
                if self.state.console_len > start_ else b""
            if clear:
                self.state.console_len = 0
        finally:
            pthread_mutex_unlock(&self.state.lock)
        return out

    @property
    def console_dropped(self):
        """Console bytes dropped because the buffer reached its 64 MiB cap."""
        return self.state.console_dropped

    @property
    def coalesced_unhandled(self):
        """Coalesced writes that landed outside any fast handler (never silently: counted here)."""
        return self.state.coalesced_unhandled

    @property
    def coalesced_flushed(self):
        """Coalesced ring entries taken by unregistering a zone (applied or returned
        there), outside any vCPU's run and so in no vCPU's stats()."""
        return self.state.coalesced_flushed

    def port_counts(self):
        """Accesses to ports with no handler (when the PIO default is H_IGNORE): {port: count}.
        A vCPU inside run() adds its latest ones when its run loop returns (at every exit a
        Python handler takes, a kick, or the end of the run)."""
        cdef int p
        return {p: self.state.port_counts[p] for p in range(NR_PORTS) if self.state.port_counts[p]}

    def close(self):
        """Close the VM fd and its vCPUs.  Memory views stay valid until dropped.  Idempotent.

        Refused (StateError), closing nothing, while any of its vCPUs is inside run()."""
        cdef VcpuCore vcpu
        cdef list claimed = []
        if self.forkgen == kvmsys_fork_generation:
            try:
                for vcpu in self.vcpus.alive():
                    if not vcpu.closed:
                        vcpu.claim("close its VM")
                        claimed.append(vcpu)
            except BaseException:
                for vcpu in claimed:
                    kvmsys_store_int(&vcpu.v.active, 0)
                raise
            for vcpu in claimed:
                vcpu.close_claimed()
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1
        if self.ring_page is not None:
            if self.forkgen == kvmsys_fork_generation:
                pthread_mutex_lock(&self.state.ring_lock)     # not while a flush reads it
                self.state.ring = NULL
                pthread_mutex_unlock(&self.state.ring_lock)
            else:
                self.state.ring = NULL      # a fork child: a parent thread may hold the lock
            self.ring_page = None           # unmapped: the kernel VM can go
        self.slots.clear()
        del self.starts[:], self.by_start[:]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __dealloc__(self):
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1
        if self.state != NULL:
            vm_free(self.state)
            free(self.state)
            self.state = NULL
