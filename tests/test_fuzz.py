"""Fuzzing: every public method of Kvm, Vm, Vcpu and VcpuHandle, with random arguments
in range and out, over both ABIs.  The only acceptable outcomes are success or a
KvmsysError: no other exception, no crash, no hang (runs are kicked by a backstop),
and no fd or mapping left behind once the machines are closed."""
import gc
import inspect
import os
import threading

import pytest

pytest.importorskip("hypothesis", reason="env: hypothesis is not installed (pip install '.[test]')")
from hypothesis import HealthCheck, Phase, given, settings, strategies as st   # noqa: E402

import kvmsys                                           # noqa: E402
from kvmsys.errors import KvmsysError                   # noqa: E402
from kvmsys.machine import Machine                      # noqa: E402

# Methods left out: they end the object under test (close, renew...) or move it onto
# another kernel vCPU; everything else is fair game.
SKIP = {"close", "renew", "replace_kernel_vcpu", "create_vcpu", "create_vm", "handle", "mark_pristine"}

BOUNDARIES = [0, 1, 2, 15, 16, 255, 256, 0xE9, 0xF4, 0x3F8, 4096, 0xFFFF, 0x10000, 2 ** 31 - 1, 2 ** 31,
              2 ** 32 - 1, 2 ** 32, 2 ** 52, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1, 2 ** 64, 2 ** 70, -1, -2 ** 63]
INTS = st.one_of(st.integers(-2, 300), st.sampled_from(BOUNDARIES), st.integers())
ARG = st.one_of(
    INTS, INTS, st.floats(), st.booleans(), st.none(), st.text(max_size=4), st.binary(max_size=64),
    st.lists(INTS, max_size=4), st.lists(st.tuples(INTS, INTS), max_size=3),
    st.dictionaries(st.sampled_from(["rax", "rip", "function", "cs", "x", 0x10]), INTS, max_size=3),
    st.just(print), st.just(b"\0" * 4096),
)


def methods(obj):
    """(name, bound method, parameters) of *obj*'s public methods."""
    out = []
    for name in dir(type(obj)):
        if name.startswith("_") or name in SKIP:
            continue
        attr = getattr(type(obj), name)
        if isinstance(attr, property) or not callable(attr):
            continue
        try:
            params = list(inspect.signature(getattr(obj, name)).parameters.values())
        except (TypeError, ValueError):
            continue
        out.append((name, getattr(obj, name), params))
    return sorted(out, key=lambda m: m[0])


def mutate(draw, value):
    """A near-valid argument: a getter's result with one part replaced or bytes flipped."""
    if isinstance(value, dict) and value:
        key = draw(st.sampled_from(sorted(value, key=str)))
        return dict(value, **{str(key): draw(ARG)}) if isinstance(key, str) else value
    if isinstance(value, bytes) and value:
        b = bytearray(value)
        for _ in range(draw(st.integers(1, 4))):
            b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
        return bytes(b) if draw(st.booleans()) else bytes(b[:draw(st.integers(0, len(b)))])
    return draw(ARG)


def call(draw, obj, name, fn, params, getters):
    args, kwargs = [], {}
    for p in params:
        if p.kind is p.VAR_POSITIONAL:
            args += draw(st.lists(ARG, max_size=2))
            continue
        if p.kind is p.VAR_KEYWORD:
            continue
        if p.default is not p.empty and draw(st.booleans()):
            continue        # leave an optional parameter out
        if p.name == "log_dirty":   # a dirty bitmap for a random (huge) slot could exhaust host memory
            if p.default is p.empty:
                kwargs[p.name] = False
            continue
        getter = getters.get(name)
        value = mutate(draw, getter()) if getter is not None and not args and draw(st.booleans()) else draw(ARG)
        if p.kind is p.KEYWORD_ONLY:
            kwargs[p.name] = value
        else:
            args.append(value)
    try:
        fn(*args, **kwargs)
    except KvmsysError:
        pass                # the only failure a caller may see


def getters_of(obj):
    """set_X -> get_X (a valid value to mutate), where both exist."""
    out = {}
    for name in dir(type(obj)):
        if name.startswith("set_") and hasattr(obj, "get_" + name[4:]):
            get = getattr(obj, "get_" + name[4:])
            if any(p.default is p.empty for p in inspect.signature(get).parameters.values()):
                continue        # a getter that needs arguments (get_msrs, get_irqchip)

            def safe(get=get):
                try:
                    return get()
                except KvmsysError:
                    return None
            out[name] = safe
    return out


def fuzz(draw, abi, steps):
    m = Machine(abi, devices=True)
    try:
        vcpu = m.attach(0)
        m.load("pio_out_loop.pm32", n=5)
        handle = vcpu.handle()
        targets = [vm_ for vm_ in [m.vm]] + [vcpu, handle, m.vm.kvm]
        table = [(obj, *meth) for obj in targets for meth in methods(obj)]
        getters = {id(obj): getters_of(obj) for obj in targets}
        for _ in range(steps):
            obj, name, fn, params = draw(st.sampled_from(table))
            backstop = None
            if name == "run" or (name == "complete_pending_io"):
                # a random guest state may never exit: the kick ends any run
                backstop = threading.Timer(1.0, lambda: _kick(handle))
                backstop.start()
            try:
                call(draw, obj, name, fn, params, getters[id(obj)])
            finally:
                if backstop is not None:
                    backstop.cancel()
        if abi == "fd":         # the run entry point of the syscall ABI, with no vCPU argument
            pass
        else:
            backstop = threading.Timer(1.0, lambda: _kick(handle))
            backstop.start()
            try:
                call(draw, None, "run", kvmsys.run, list(inspect.signature(kvmsys.run).parameters.values()), {})
            finally:
                backstop.cancel()
    finally:
        m.close()


def _kick(handle):
    try:
        handle.kick()
    except KvmsysError:
        pass


def fds_and_maps():
    """Open fds and kvmsys's named mappings (comm areas: anon_inode:kvm-vcpu): a VM or
    vCPU left behind keeps one of them.  (Guest RAM is anonymous, like malloc's arenas
    and thread stacks, whose number the backstop threads change: the soak tests count
    mappings on paths without extra threads.)"""
    gc.collect()
    with open("/proc/self/maps") as f:
        kvm_maps = sum(1 for line in f if "kvm" in line)
    return len(os.listdir("/proc/self/fd")), kvm_maps


@pytest.mark.parametrize("abi", ["fd", "sys"])
def test_fuzz_every_public_method(abi):
    def session(examples):
        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck),
                  derandomize=True, phases=[Phase.explicit, Phase.generate])
        @given(st.data())
        def run(data):
            fuzz(data.draw, abi, steps=25)
        run()

    session(5)                  # warm-up: thread stacks and malloc arenas of the backstop timers
    before = fds_and_maps()
    session(120)
    after = fds_and_maps()
    assert after == before, f"(fds, kvm mappings): {before} -> {after}"
