"""cuda kernels for grouped_gemm, grouped_mlp, moe_mlp and their backward (none yet: see the package docstring)."""
