"""cuda kernels for dispatch, combine and their backward (none yet: see the package docstring)."""
