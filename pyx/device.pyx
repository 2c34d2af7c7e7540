# Device fds (KVM_CREATE_DEVICE): in-kernel devices configured through attributes.


cdef class DeviceCore:
    """A KVM device fd: KVM_SET/GET/HAS_DEVICE_ATTR on (group, attr) pairs that its
    device type defines (e.g. KVM_DEV_VFIO_FILE / KVM_DEV_VFIO_FILE_ADD for VFIO)."""
    cdef int fd
    cdef readonly VmCore vm
    cdef readonly uint32_t type

    def __cinit__(self):
        self.fd = -1            # never fd 0: one made by __new__ must not close stdin

    def __init__(self, *args, **kwargs):
        raise ArgumentTypeError("device objects come from Vm.create_device(); they cannot be constructed")

    def __dealloc__(self):
        if self.fd >= 0:
            close(self.fd)

    cdef int require_open(self) except -1:
        if self.fd < 0:
            raise StateError("the device fd is closed")
        return 0

    cdef int attr_ioctl(self, unsigned long req, uint32_t group, uint64_t attr, void *data, str op) except -1:
        self.require_open()
        cdef kvm_device_attr a
        memset(&a, 0, sizeof(a))
        a.group = group
        a.attr = attr
        a.addr = <uint64_t>data
        return ioctl_checked(self.fd, req, &a, op)

    def has_attr(self, group, attr):
        """KVM_HAS_DEVICE_ATTR: True if the device knows (group, attr)."""
        self.require_open()
        cdef kvm_device_attr a
        memset(&a, 0, sizeof(a))
        a.group = as_u32(group, "attribute group")
        a.attr = as_u64(attr, "attribute")
        if ioctl_nogil(self.fd, KVM_HAS_DEVICE_ATTR, &a) == 0:
            return True
        if errno == ENXIO:
            return False
        raise_os(errno, "KVM_HAS_DEVICE_ATTR")

    def set_attr(self, group, attr, data=None):
        """KVM_SET_DEVICE_ATTR: *data* is the attribute's value as bytes (its size is the
        attribute's), an int (written as a 32-bit int: VFIO takes an fd so), or None."""
        cdef bytearray buf
        cdef int32_t value
        if data is None:
            self.attr_ioctl(KVM_SET_DEVICE_ATTR, as_u32(group, "attribute group"), as_u64(attr, "attribute"),
                            NULL, "KVM_SET_DEVICE_ATTR")
        elif isinstance(data, int):
            require(-(1 << 31) <= data < (1 << 31), "an int attribute value must fit in 32 bits")
            value = data
            self.attr_ioctl(KVM_SET_DEVICE_ATTR, as_u32(group, "attribute group"), as_u64(attr, "attribute"),
                            &value, "KVM_SET_DEVICE_ATTR")
        else:
            buf = bytearray(as_blob(data, "set_attr"))
            require(len(buf) > 0, "attribute data is empty")
            self.attr_ioctl(KVM_SET_DEVICE_ATTR, as_u32(group, "attribute group"), as_u64(attr, "attribute"),
                            <char *>buf, "KVM_SET_DEVICE_ATTR")

    def get_attr(self, group, attr, size=8):
        """KVM_GET_DEVICE_ATTR: *size* bytes of the attribute's value (the device defines it)."""
        cdef size_t size_ = as_uint(size, "attribute size", 65536)
        require(size_ > 0, "attribute size must be 1..65536 bytes")
        cdef bytearray buf = bytearray(size_)
        self.attr_ioctl(KVM_GET_DEVICE_ATTR, as_u32(group, "attribute group"), as_u64(attr, "attribute"),
                        <char *>buf, "KVM_GET_DEVICE_ATTR")
        return bytes(buf)

    def fileno(self):
        self.require_open()
        return self.fd

    @property
    def closed(self):
        return self.fd < 0

    def close(self):
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<DeviceCore type={self.type} fd={self.fd}>"
