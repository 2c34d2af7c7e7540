# KVM's binary statistics (KVM_GET_STATS_FD): the fd the kernel serves a VM's or a
# vCPU's counters from, and the sizes of its structs.  Decoding the header, the
# descriptors and the values is policy, in kvmsys/kvmstats.py.

STATS_LAYOUT = dict(
    header_size=sizeof(kvm_stats_header), desc_size=sizeof(kvm_stats_desc),
    type_mask=KVM_STATS_TYPE_MASK, type_cumulative=KVM_STATS_TYPE_CUMULATIVE,
    type_instant=KVM_STATS_TYPE_INSTANT, type_peak=KVM_STATS_TYPE_PEAK,
    type_linear_hist=KVM_STATS_TYPE_LINEAR_HIST, type_log_hist=KVM_STATS_TYPE_LOG_HIST,
    unit_mask=KVM_STATS_UNIT_MASK, unit_none=KVM_STATS_UNIT_NONE, unit_bytes=KVM_STATS_UNIT_BYTES,
    unit_seconds=KVM_STATS_UNIT_SECONDS, unit_cycles=KVM_STATS_UNIT_CYCLES,
    unit_boolean=KVM_STATS_UNIT_BOOLEAN, base_mask=KVM_STATS_BASE_MASK, base_pow2=KVM_STATS_BASE_POW2,
)


def stats_fd(owner):
    """A new fd serving *owner*'s (a VmCore or VcpuCore) binary statistics; the caller
    closes it."""
    if isinstance(owner, VmCore):
        return (<VmCore>owner).vm_ioctl(KVM_GET_STATS_FD, NULL, "KVM_GET_STATS_FD")
    if isinstance(owner, VcpuCore):
        return (<VcpuCore>owner).vcpu_ioctl(KVM_GET_STATS_FD, NULL, "KVM_GET_STATS_FD")
    raise ArgumentTypeError(f"statistics belong to a VM or a vCPU, not {type(owner).__name__}")
