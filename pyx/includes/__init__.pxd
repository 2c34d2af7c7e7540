# Cython package marker for pyx/includes (cimport includes.kvm, includes.posix).
