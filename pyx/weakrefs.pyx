# A set of objects held weakly whose add and discard run no Python code (a WeakSet's
# methods are Python code, where a Ctrl-C can land): add_vcpu() and remove_vcpu() use
# them inside steps that must not be cut in half (see steps() in binding.pyx).
from cpython.weakref cimport PyWeakref_NewRef


cdef class _WeakRefs:
    cdef dict refs          # address -> weakref.ref (dead ones dropped as they are seen)
    cdef Py_ssize_t prune_at

    def __cinit__(self):
        self.refs = {}
        self.prune_at = 64

    cdef int add(self, object obj) except -1:
        if len(self.refs) >= self.prune_at:
            self.alive()
            self.prune_at = 2 * len(self.refs) + 64
        self.refs[<Py_ssize_t><void *>obj] = PyWeakref_NewRef(obj, None)
        return 0

    cdef int discard(self, object obj) except -1:
        cdef Py_ssize_t key = <Py_ssize_t><void *>obj
        ref = self.refs.get(key)
        if ref is not None and ref() is obj:
            del self.refs[key]
        return 0

    cdef list alive(self):
        cdef list out = []
        for key, ref in list(self.refs.items()):
            obj = ref()
            if obj is None:
                del self.refs[key]
            else:
                out.append(obj)
        return out
