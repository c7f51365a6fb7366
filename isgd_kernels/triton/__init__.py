"""Triton kernels. Importing this package requires Triton; isgd_kernels imports it lazily."""
