"""Build the Cython core (pyx/) into the kvmsys package as kvmsys._core, and the
benchmark harness's C reference loops (pyx/bench/) as kvmsys_bench._reference: a
separate extension that shares only the C declarations, so kvmsys's own extension
exports no reference loops and no ioctl numbers."""
from Cython.Build import cythonize
from setuptools import Extension, setup

# -g0: Python's own CFLAGS ask for -g, which makes compiling the generated C about a
# third slower and the wheel larger, for symbols of generated code nobody steps through.
COMMON = dict(include_dirs=["pyx"], extra_compile_args=["-O2", "-g0", "-Wno-unused-function"])

core = Extension(
    "kvmsys._core",
    sources=["pyx/_core.pyx"],
    libraries=["rt"],  # timer_create on glibc < 2.34
    **COMMON,
)
reference = Extension(
    "kvmsys_bench._reference",
    sources=["pyx/bench/_reference.pyx"],
    libraries=["pthread"],
    **COMMON,
)

setup(
    # the two extensions compile side by side (setuptools' build_ext --parallel)
    options={"build_ext": {"parallel": 2}},
    ext_modules=cythonize(
        [core, reference],
        include_path=["pyx"],
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "embedsignature": True},
    ),
)
