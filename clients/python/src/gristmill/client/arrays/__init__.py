"""N-d arrays stored as Zarr v3, used like h5py: ``File``, ``create_dataset``, ``ds[a:b, :, 3]``.

    from gristmill.client.arrays import File

    with File("127.0.0.1:7450", "a") as f:          # a server (or File("some/dir", "a"))
        ds = f.create_dataset("features", shape=(1000, 512), dtype="float32", chunks=(100, 512))
        ds[:10] = 1.0
        print(ds[5, :4], f["features"].shape, list(f))

Needs the ``arrays`` extra (zarr-python); see docs/arrays.md.
"""

from __future__ import annotations

from gristmill.client.arrays.h5 import Dataset, File, Group, is_server_address
from gristmill.client.arrays.pipeline import GristmillCodecPipeline
from gristmill.client.arrays.store import GrpcZarrStore

__all__ = ["Dataset", "File", "GristmillCodecPipeline", "Group", "GrpcZarrStore",
           "is_server_address"]
