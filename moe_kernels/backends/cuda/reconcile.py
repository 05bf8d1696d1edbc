"""cuda kernels for reconcile and its backward (none yet: see the package docstring)."""
