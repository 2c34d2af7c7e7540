"""README's Python examples run as written (each in a fresh interpreter) and print what
README says they print: the comments that begin with `<` are the expected output lines."""
import re
import subprocess
import sys
import tempfile

import pytest

from test_types import readme_examples

EXAMPLES = readme_examples()


def expected_output(code):
    return [m.group(1).strip() for m in re.finditer(r"#\s*(<.*)$", code, re.M)]


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs_and_prints_what_readme_says(index):
    code = EXAMPLES[index]
    expected = expected_output(code)
    assert expected, "every README example shows its output"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=tempfile.gettempdir())
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.splitlines() == expected, p.stdout
