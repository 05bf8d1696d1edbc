"""triton kernels for the load-balancing, z- and mutual-information losses (none yet: see the package docstring)."""
