"""Both ABIs start from the same VM: the syscall ABI's process VM is as bare as an fd-ABI
VM (no memory, no port handled in C) unless configure() asks, so the LWN article's
"Using the KVM API" example runs line by line over either ABI and sees its IoExits."""
import inspect
import pydoc
import re
import subprocess
import sys
import tempfile

import pytest

import kvmsys

# LWN's example guest: print ax+bx as a digit and a newline to port 0x3f8, then halt
LWN = """
import sys, kvmsys
from kvmsys import Kvm
abi = sys.argv[1]
CODE = bytes([0xba, 0xf8, 0x03, 0x00, 0xd8, 0x04, ord("0"), 0xee, 0xb0, ord("\\n"), 0xee, 0xf4])
if abi == "fd":
    vm = Kvm().create_vm()
else:
    vm = kvmsys.vm()                               # the process VM, as configure() left it
print(sorted(vm.memory_slots), vm.handlers())
vm.add_memory(0, 0x1000, 0x1000)                   # slot 0, as in the article
vm.write(0x1000, CODE)
if abi == "fd":
    vcpu = vm.create_vcpu(0)
    run = vcpu.run
else:
    kvmsys.add_vcpu()
    vcpu, run = kvmsys.current(), kvmsys.run
sregs = vcpu.get_sregs()
sregs["cs"]["base"] = sregs["cs"]["selector"] = 0
vcpu.set_sregs(sregs)
regs = vcpu.get_regs()
regs.update(rip=0x1000, rax=2, rbx=2, rflags=0x2)
vcpu.set_regs(regs)
out = []
while True:
    ex = run(timeout=10)
    if isinstance(ex, kvmsys.IoExit):
        out.append(chr(ex.value))
        continue
    print(type(ex).__name__, repr("".join(out)))
    break
"""


@pytest.mark.parametrize("abi", ["fd", "sys"])
def test_lwn_example_line_by_line_over_both_abis(abi):
    p = subprocess.run([sys.executable, "-c", LWN, abi], capture_output=True, text=True, timeout=60,
                       cwd=tempfile.gettempdir())
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.splitlines() == ["[] []", "HltExit '4\\n'"], p.stdout


@pytest.mark.nokvm
def test_configure_shows_its_options():
    params = inspect.signature(kvmsys.configure).parameters
    assert {n: (p.kind, p.default) for n, p in params.items()} == {
        "memory_size": (inspect.Parameter.KEYWORD_ONLY, 0),
        "irqchip": (inspect.Parameter.KEYWORD_ONLY, False),
        "pit": (inspect.Parameter.KEYWORD_ONLY, False),
        "pc_ports": (inspect.Parameter.KEYWORD_ONLY, False),
        "placement": (inspect.Parameter.KEYWORD_ONLY, "float"),
    }
    text = pydoc.render_doc(kvmsys.configure, renderer=pydoc.plaintext)
    assert re.search(r"memory_size: '?int'? = 0", text) and re.search(r"pc_ports: '?bool'? = False", text), text


def test_configure_sets_every_option_and_refuses_unknown_ones(fresh_process_vm):
    from kvmsys import syscall
    from kvmsys.errors import InvalidArgumentError
    kvmsys.destroy_vm()
    kvmsys.configure(memory_size=1 << 20, pc_ports=True)
    assert syscall.config() == dict(syscall.DEFAULTS, memory_size=1 << 20, pc_ports=True)
    kvmsys.configure(irqchip=True)                  # the others back to their defaults
    assert syscall.config() == dict(syscall.DEFAULTS, irqchip=True)
    with pytest.raises(TypeError):
        kvmsys.configure(memory=1 << 20)            # a misspelt option is no silent default
    with pytest.raises(InvalidArgumentError):
        kvmsys.configure(memory_size=4095)
    with pytest.raises(InvalidArgumentError):
        with syscall.fresh_vm(memory=1):
            pass
