"""Execution: operator semantics, the reference executor, and the dask runtime (``Deployment``)."""
