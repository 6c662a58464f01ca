"""Out-of-core score maps: gigapixel images read by region, maps written into zarr stores.

- :mod:`cnnserve.large.sources`: images read by region (TIFF, zarr, ``.npy``, pictures).
- :mod:`cnnserve.large.sinks`: the zarr map store, tile by tile, resumable.
- :mod:`cnnserve.large.run`: :func:`score_map_to_zarr`, in one process or on a Dask cluster.

Needs the ``large`` extra (``tifffile``, ``zarr``) and, for a cluster, the ``dask`` extra.
"""

from cnnserve.large.run import LargeMap, connect, local_cluster, score_map_to_zarr
from cnnserve.large.sinks import MapStoreError
from cnnserve.large.sources import SourceError, open_source

__all__ = [
    "LargeMap",
    "MapStoreError",
    "SourceError",
    "connect",
    "local_cluster",
    "open_source",
    "score_map_to_zarr",
]
