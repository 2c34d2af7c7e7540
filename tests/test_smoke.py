import pytest

from kvmsys import StopExit


@pytest.mark.parametrize("mode", ["real", "pm32", "long64"])
def test_hello_prints_and_stops(machine, mode):
    machine.devices().load(f"hello.{mode}")
    ex = machine.run(timeout=10)
    assert isinstance(ex, StopExit) and ex.status == 1
    assert machine.vm.console() == b"Hello, world!\n"
