"""A PlanSpec, checked: the samples of a dataset version, their buckets, how to decode them."""

from __future__ import annotations

import functools
import hashlib
import posixpath
import re
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from gristmill.client.buckets import Bucket, bucket_table
from gristmill.client.errors import FailedPrecondition, InvalidArgument
from gristmill.client.names import MAX_PATH_BYTES, validate_dataset_name
from gristmill.client.planner import PlanConfig, Policy, SampleSet
from gristmill.decode.transform import Color, Encoding, Transform, transform_from_proto
from gristmill.v1 import ingest_pb2, store_pb2

__all__ = [
    "PlanRow",
    "Samples",
    "SpecInfo",
    "check_spec",
    "companion_paths",
    "plan_id",
    "rows_from_entries",
    "sample_seed",
]

_POLICY = {ingest_pb2.PLAN_POLICY_UNSPECIFIED: Policy.EXACT,
           ingest_pb2.PLAN_POLICY_EXACT: Policy.EXACT,
           ingest_pb2.PLAN_POLICY_HASH: Policy.HASH,
           ingest_pb2.PLAN_POLICY_SEQUENTIAL: Policy.SEQUENTIAL}
_FIELDS = {"stem", "name", "path"}
#: Companion templates per spec, and characters per template.
MAX_COMPANIONS = 16
MAX_TEMPLATE_CHARS = 256
#: Largest batch one rank may ask for.
MAX_BATCH_SIZE = 4096
MAX_WORLD_SIZE = 65536
#: An annotation release's name (as the annotate service allows).
RELEASE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class SpecInfo:
    """What a valid spec means, apart from its samples."""

    config: PlanConfig
    transform: Transform
    #: The buckets samples are sorted into (one for a fixed size).
    buckets: tuple[Bucket, ...]


def check_spec(spec: ingest_pb2.PlanSpec) -> SpecInfo:
    """Validate every field of a spec (InvalidArgument naming the field and the fix)."""
    validate_dataset_name(spec.dataset, "spec.dataset")
    _check_release(spec)
    if not 1 <= spec.batch_size <= MAX_BATCH_SIZE:
        raise InvalidArgument("spec.batch_size", f"must be 1 to {MAX_BATCH_SIZE}, got "
                              f"{spec.batch_size}")
    if not 1 <= spec.world_size <= MAX_WORLD_SIZE:
        raise InvalidArgument("spec.world_size", f"must be 1 to {MAX_WORLD_SIZE} (the number "
                              f"of training ranks), got {spec.world_size}")
    if spec.policy not in _POLICY:
        raise InvalidArgument("spec.policy", f"unknown policy {spec.policy}; use EXACT, HASH "
                              "or SEQUENTIAL")
    if len(spec.companions) > MAX_COMPANIONS:
        raise InvalidArgument("spec.companions", f"at most {MAX_COMPANIONS} companion "
                              f"templates, got {len(spec.companions)}")
    for i, template in enumerate(spec.companions):
        _check_template(template, f"spec.companions[{i}]")
    if not spec.HasField("transform") or spec.transform.WhichOneof("size") is None:
        raise InvalidArgument("spec.transform", "set transform.buckets (e.g. image_size 512, "
                              "downsampling 16) or transform.fixed (width and height)")
    transform = transform_from_proto(spec.transform)
    if transform.encoding is not Encoding.RAW:
        raise InvalidArgument("spec.transform.encoding", "the training feed carries raw "
                              "pixels; leave encoding unspecified or RAW")
    if transform.color is Color.KEEP:
        raise InvalidArgument("spec.transform.color", "batches need one layout; use RGB, "
                              "RGBA or GRAY")
    if transform.buckets is not None:
        buckets = bucket_table(transform.buckets).buckets
    else:
        assert transform.size is not None
        w, h = transform.size
        buckets = (Bucket(0, w, h, round(w / h, 3)),)
    config = PlanConfig(batch_size=spec.batch_size, world_size=spec.world_size, seed=spec.seed,
                        policy=_POLICY[spec.policy], drop_last=spec.drop_last)
    return SpecInfo(config, transform, buckets)


def _check_release(spec: ingest_pb2.PlanSpec) -> None:
    """A release name as the annotate service allows; its position only with a name."""
    if spec.release and not RELEASE_NAME.fullmatch(spec.release):
        shown = spec.release if len(spec.release) <= 80 else spec.release[:77] + "..."
        raise InvalidArgument("spec.release", f"{shown!r} is not a release name (1-128 "
                              "characters of letters, digits, '.', '_' or '-', starting with a "
                              "letter or digit); list releases "
                              "with `gristmill annotate releases DATASET`")
    if not spec.release and (spec.release_seq or spec.release_head_hash):
        raise InvalidArgument("spec.release_seq", "a release position without a release "
                              "name; set spec.release, or leave both unset")
    if spec.release_seq < 0:
        raise InvalidArgument("spec.release_seq", "must not be negative; leave it unset in "
                              "PlanEpoch, which pins it")


def _check_template(template: str, field: str) -> None:
    """Refuse a template that is more than literal text and plain fields.

    Only ``{stem}``, ``{name}`` and ``{path}``: no conversion (``!r``), format
    spec (``:>99``), attribute or index, and no escaped braces.
    """
    shown = template if len(template) <= 80 else template[:77] + "..."

    def bad(why: str) -> InvalidArgument:
        return InvalidArgument(field, f"bad template {shown!r}: {why}; use literal text and "
                               "{stem}, {name} or {path}, e.g. 'masks/{stem}.png'")

    if not template:
        raise bad("it is empty")
    if len(template) > MAX_TEMPLATE_CHARS:
        raise bad(f"it is longer than {MAX_TEMPLATE_CHARS} characters")
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise bad(str(e)) from None
    for literal, name, spec, conversion in parts:
        if "{" in literal or "}" in literal:
            raise bad("escaped braces ('{{', '}}') are not allowed")
        if name is None:
            continue
        if name not in _FIELDS:
            raise bad(f"{{{name}}} is not a field")
        if conversion is not None or spec:
            raise bad(f"{{{name}}} has a conversion or format spec")


def companion_paths(path: str, prefix: str, templates: Sequence[str]) -> tuple[str, ...]:
    """The companion paths of the sample at ``path`` (templates checked by check_spec).

    Raises:
        InvalidArgument: a path would be longer than a store path may be.
    """
    below = path[len(prefix):] if prefix and path.startswith(prefix) else path
    stem = posixpath.splitext(below)[0]
    name = posixpath.splitext(posixpath.basename(path))[0]
    values = {"stem": len(stem.encode()), "name": len(name.encode()),
              "path": len(path.encode())}
    out = []
    for i, t in enumerate(templates):
        # plain substitutions only: the result's length is known before it is built
        length = len(t.encode()) + sum(values[f] for f in _fields(t))
        if length > MAX_PATH_BYTES:
            raise InvalidArgument(f"spec.companions[{i}]", f"template {t!r} makes a path of "
                                  f"about {length} bytes from {path!r}, over the "
                                  f"{MAX_PATH_BYTES} bytes a store path may have; shorten it")
        out.append(t.format(stem=stem, name=name, path=path))
    return tuple(out)


@functools.lru_cache(maxsize=256)
def _fields(template: str) -> tuple[str, ...]:
    return tuple(f for _, f, _, _ in string.Formatter().parse(template) if f is not None)


def plan_id(spec: ingest_pb2.PlanSpec) -> str:
    """Digest of a (resolved) spec: equal ids, equal plans."""
    return hashlib.sha256(spec.SerializeToString(deterministic=True)).hexdigest()[:32]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The crop seed of one sample in one epoch: a resumed stream crops alike."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@dataclass(frozen=True)
class Samples:
    """The samples of a version: ids in manifest order, buckets, companion paths."""

    set: SampleSet
    companions: tuple[tuple[str, ...], ...]
    #: Encoded bytes of each sample, companions included (from the manifest).
    sizes: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.set)

    @classmethod
    def from_manifest(cls, spec: ingest_pb2.PlanSpec, info: SpecInfo,
                      entries: Iterable[store_pb2.FileEntry]) -> Samples:
        """Samples of a manifest's entries (see :meth:`from_rows`)."""
        return cls.from_rows(spec, info, rows_from_entries(entries))

    @classmethod
    def from_rows(cls, spec: ingest_pb2.PlanSpec, info: SpecInfo, rows: Sequence[PlanRow],
                  *, selected: bool = False) -> Samples:
        """Samples of a manifest's planning columns: images under the prefix, not companions.

        ``rows`` are (path, is image, width, height, size) sorted by path: every
        file of the version, or with ``selected`` only the image files under
        the prefix (enough when the spec has no companions). A file counts as
        an image when the store read its header, or when its media type says
        image (a corrupt file is then planned and reported as a per-sample
        error when decoded, instead of silently vanishing). Without companions
        no path is built or looked up: the cost per sample is a few list
        items and numpy elements.
        """
        prefix = spec.prefix
        chosen = rows if selected else [r for r in rows if r[1] and r[0].startswith(prefix)]
        if spec.companions:
            return cls._with_companions(spec, info, rows, chosen)
        if not chosen:
            raise _no_samples(spec)
        return cls.from_columns(info, [r[0] for r in chosen], [r[2] for r in chosen],
                                [r[3] for r in chosen], [r[4] for r in chosen])

    @classmethod
    def from_columns(cls, info: SpecInfo, paths: Sequence[str], widths: Sequence[int],
                     heights: Sequence[int], sizes: Sequence[int]) -> Samples:
        """Samples without companions from columns of the chosen images, sorted by path."""
        ids = tuple(paths)
        bucketed = len(info.buckets) > 1  # one bucket: no sizes needed
        sample_set = _sample_set(info, ids, widths if bucketed else (),
                                 heights if bucketed else ())
        return cls(sample_set, ((),) * len(ids), tuple(sizes))

    @classmethod
    def _with_companions(cls, spec: ingest_pb2.PlanSpec, info: SpecInfo,
                         rows: Sequence[PlanRow], chosen: Sequence[PlanRow]) -> Samples:
        companions = [companion_paths(r[0], spec.prefix, spec.companions) for r in chosen]
        taken = {p for c in companions for p in c}
        keep = [i for i, r in enumerate(chosen) if r[0] not in taken]
        if not keep:
            raise _no_samples(spec)
        ids = tuple(chosen[i][0] for i in keep)
        sample_set = _sample_set(info, ids, [chosen[i][2] for i in keep],
                                 [chosen[i][3] for i in keep])
        size_of = {r[0]: r[4] for r in rows}
        encoded = tuple(chosen[i][4] + sum(size_of.get(c, 0) for c in companions[i])
                        for i in keep)
        return cls(sample_set, tuple(companions[i] for i in keep), encoded)


#: A manifest entry's planning columns: path, is image (0/1), width, height (as displayed,
#: 0 when unknown), size in bytes.
PlanRow = tuple[str, int, int, int, int]


def rows_from_entries(entries: Iterable[store_pb2.FileEntry]) -> list[PlanRow]:
    """Planning columns of manifest entries (a remote store's manifest, a folder's)."""
    rows: list[PlanRow] = []
    for e in entries:
        image = e.HasField("image")
        rows.append((e.path, int(image or e.media_type.startswith("image/")),
                     e.image.width if image else 0, e.image.height if image else 0, e.size))
    return rows


def _sample_set(info: SpecInfo, ids: tuple[str, ...], widths: Sequence[int],
                heights: Sequence[int]) -> SampleSet:
    if len(info.buckets) == 1:
        return SampleSet(ids, np.zeros(len(ids), dtype=np.int64))
    assert info.transform.buckets is not None
    wh = np.column_stack((np.asarray(widths, dtype=np.int64),
                          np.asarray(heights, dtype=np.int64)))
    return SampleSet.from_sizes(ids, wh, bucket_table(info.transform.buckets))


def _no_samples(spec: ingest_pb2.PlanSpec) -> FailedPrecondition:
    return FailedPrecondition(
        f"dataset {spec.dataset!r} version {spec.version} has no images under prefix "
        f"{spec.prefix!r}; check the prefix or import images first", reason="NO_SAMPLES")
