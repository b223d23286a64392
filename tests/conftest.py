import os

os.environ.setdefault("DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION", "inf")
