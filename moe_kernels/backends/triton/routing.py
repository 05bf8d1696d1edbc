"""triton kernels for route, task_route and their backward (none yet: see the package docstring)."""
