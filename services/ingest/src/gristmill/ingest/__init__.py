"""gristmill ingest: plans epochs and streams ready batches to training ranks.

The service behind :class:`gristmill.client.Loader`. In the all-in-one
server it calls the store, decode and annotate services in-process; deployed
alone it reaches them over gRPC (``ingest.store_address``,
``ingest.decode_address``, ``ingest.annotate_address``: annotations of a
release, for streams that name one; see :mod:`gristmill.ingest.labels`).
"""

from gristmill.ingest.feed import BatchFeed, DecodedBatch, batch_messages
from gristmill.ingest.samples import Samples, SpecInfo, check_spec, plan_id
from gristmill.ingest.service import SERVICE, Ingest, IngestServicer, Planner

__all__ = [
    "SERVICE",
    "BatchFeed",
    "DecodedBatch",
    "Ingest",
    "IngestServicer",
    "Planner",
    "Samples",
    "SpecInfo",
    "batch_messages",
    "check_spec",
    "plan_id",
]
