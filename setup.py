"""Build the Cython core (pyx/) into the kvmsys package as kvmsys._core."""
from Cython.Build import cythonize
from setuptools import Extension, setup

core = Extension(
    "kvmsys._core",
    sources=["pyx/_core.pyx"],
    include_dirs=["pyx"],
    libraries=["rt"],  # timer_create on glibc < 2.34
    extra_compile_args=["-O2", "-Wno-unused-function"],
)

setup(
    ext_modules=cythonize(
        [core],
        include_path=["pyx"],
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "embedsignature": True},
    ),
)
