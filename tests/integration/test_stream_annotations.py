"""Labels in the training stream: Loader(annotations=RELEASE) against real servers."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from gristmill.cli.main import main
from gristmill.client.annotations import Annotations, Sample
from gristmill.client.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    call_rpc,
    stream_rpc,
)
from gristmill.client.hub import Hub
from gristmill.client.loader import Batch, Loader
from gristmill.v1 import ingest_pb2, ingest_pb2_grpc
from scripts.sample_data import make_sample_folder
from tests.helpers import (
    DATASET,
    ROOT,
    SMALL,
    Running,
    epoch,
    loader,
    planned,
    start_in_process,
)

LABEL = {"type": "object", "properties": {"label": {"type": "string"},
                                          "score": {"type": "number"}},
         "required": ["label"], "additionalProperties": False}
Expected = dict[str, list[dict[str, Any]]]


def _item(annotation: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"annotation": annotation, "schema": "label", "schema_version": 1, "data": data}


class Labelled:
    """A log with accepted, rejected, pending and pinned labels, released as "v1"."""

    def __init__(self, running: Running) -> None:
        self.ann = Annotations(running.address, running.admin_key)
        entries = {e.path: e.sha256 for e in Hub(running.address, running.admin_key, None)
                   .list_manifest(DATASET)}
        self.paths = sorted(entries)
        ann, p = self.ann, self.paths
        ann.init(DATASET)
        ann.add_schema(DATASET, "label", LABEL)
        self.expected: Expected = {path: [] for path in p}
        self.rejected: set[str] = set()
        for i in range(8):  # one label each; accept the even ones, reject the odd
            data = {"label": f"class-{i}", "score": i / 10}
            prop = ann.propose(DATASET, "label", [p[i]], data)
            ann.review(DATASET, prop.id, accept=i % 2 == 0)
            if i % 2 == 0:
                self.expected[p[i]].append(_item(prop.id, data))
            else:
                self.rejected.add(prop.id)
        both = ann.propose(DATASET, "label", [p[0], p[9]], {"label": "pair"})  # two samples
        ann.review(DATASET, both.id, accept=True)
        for path in (p[0], p[9]):
            self.expected[path].append(_item(both.id, {"label": "pair"}))
        right = ann.propose(DATASET, "label", [Sample(p[10], entries[p[10]])], {"label": "pin"})
        ann.review(DATASET, right.id, accept=True)  # pinned to the stored content: delivered
        self.expected[p[10]].append(_item(right.id, {"label": "pin"}))
        wrong = ann.propose(DATASET, "label", [Sample(p[11], "0" * 64)], {"label": "other"})
        ann.review(DATASET, wrong.id, accept=True)  # pinned to other content: never delivered
        self.rejected.add(wrong.id)
        pending = ann.propose(DATASET, "label", [p[12]], {"label": "pending"})
        self.rejected.add(pending.id)  # never reviewed: not a label
        self.first = self.expected[p[2]][0]["annotation"]
        self.release = ann.create_release(DATASET, "v1")
        for targets in self.expected.values():
            targets.sort(key=lambda a: a["annotation"])

    def move_on(self) -> None:
        """Change the log after the release: none of it may reach a v1 stream."""
        ann, p = self.ann, self.paths
        late = ann.propose(DATASET, "label", [p[13]], {"label": "late"})
        ann.review(DATASET, late.id, accept=True)
        update = ann.propose_update(DATASET, self.first, {"label": "changed"})
        ann.review(DATASET, update.id, accept=True)
        gone = ann.propose_delete(DATASET, self.expected[p[4]][0]["annotation"])
        ann.review(DATASET, gone.id, accept=True)
        self.rejected |= {late.id}
        now = ann.annotations(DATASET, [p[2], p[13]])
        assert [a.data_json for a in now[0]] == ['{"label":"changed"}'] and now[1]


@pytest.fixture
def labelled(fed: Running) -> Any:
    lab = Labelled(fed)
    yield lab
    lab.ann.close()


def check(batches: list[Batch], expected: Expected, rejected: set[str]) -> Counter[str]:
    """Every delivered sample carries exactly its labels at v1; returns fresh deliveries."""
    fresh: Counter[str] = Counter()
    for b in batches:
        assert len(b.annotations) == len(b.ids)
        for sample, found, is_fresh in zip(b.ids, b.annotations, b.fresh, strict=True):
            assert found == expected[sample], sample
            assert not {a["annotation"] for a in found} & rejected
            fresh[sample] += bool(is_fresh)
    return fresh


def test_two_ranks_get_exactly_the_accepted_labels_of_the_release(
        labelled: Labelled, fed: Running) -> None:
    labelled.move_on()  # after the release: not in v1
    fresh: Counter[str] = Counter()
    plan_ids = set()
    for rank in (0, 1):
        with loader(fed, rank=rank, world_size=2, annotations="v1") as ld:
            assert ld.spec.release == "v1"
            assert (ld.spec.release_seq, ld.spec.release_head_hash) == (
                labelled.release.seq, labelled.release.head_hash)
            plan_ids.add(ld.plan_id)
            fresh += check(epoch(ld), labelled.expected, labelled.rejected)
    assert len(plan_ids) == 1
    assert sorted(fresh) == labelled.paths and set(fresh.values()) == {1}
    assert sum(bool(v) for v in labelled.expected.values()) == 6
    with loader(fed) as plain:  # no release: empty lists, and another plan
        batch = next(iter(plain))
        assert batch.annotations == [[]] * len(batch) and plain.plan_id not in plan_ids


def test_a_resumed_stream_gets_the_same_labels(labelled: Labelled, fed: Running) -> None:
    with loader(fed, seed=4, rank=1, world_size=2, annotations="v1") as ld:
        whole = epoch(ld)
    with loader(fed, seed=4, rank=1, world_size=2, annotations="v1") as ld:
        it = iter(ld)
        first = [next(it), next(it)]
        state = ld.state_dict()
        it.close()  # the process "dies" here
    labelled.move_on()  # the log moves on before the resume
    with loader(fed, seed=4, rank=1, world_size=2, annotations="v1") as ld:
        ld.load_state_dict(state)
        rest = epoch(ld)
    assert planned(first + rest) == planned(whole)
    assert [b.annotations for b in first + rest] == [b.annotations for b in whole]
    check(first + rest, labelled.expected, labelled.rejected)
    with loader(fed, seed=4, rank=1, world_size=2) as other, \
            pytest.raises(ValueError, match="different plan"):
        other.load_state_dict(state)  # a run without the release is another plan


def test_unknown_release_and_bad_specs_fail_at_plan_time(labelled: Labelled,
                                                         fed: Running) -> None:
    with pytest.raises(NotFound, match=r"no release 'v2'.*gristmill annotate release photos v2"):
        loader(fed, annotations="v2")
    with pytest.raises(InvalidArgument, match="spec.release"):
        loader(fed, annotations="no/slashes")
    stub = ingest_pb2_grpc.IngestServiceStub(fed.channel())
    spec = loader(fed, annotations="v1").spec
    moved = ingest_pb2.PlanSpec()
    moved.CopyFrom(spec)
    moved.release_seq += 1  # a position the release does not have
    with pytest.raises(FailedPrecondition, match="pinned it at"):
        call_rpc(stub.PlanEpoch, ingest_pb2.PlanEpochRequest(spec=moved))
    unpinned = ingest_pb2.PlanSpec()
    unpinned.CopyFrom(spec)
    unpinned.release_seq, unpinned.release_head_hash = 0, ""
    with pytest.raises(InvalidArgument, match="release_head_hash"):
        list(Loader(fed.address, DATASET, api_key=fed.admin_key,
                    transport=_Unplanned(stub, unpinned), **SMALL))  # type: ignore[arg-type]


class _Unplanned:
    """A transport whose StreamBatches sends a spec that PlanEpoch did not return."""

    def __init__(self, stub: ingest_pb2_grpc.IngestServiceStub, spec: ingest_pb2.PlanSpec
                 ) -> None:
        self.stub, self.spec = stub, spec

    def plan(self, request: ingest_pb2.PlanEpochRequest) -> ingest_pb2.PlanEpochResponse:
        resp: ingest_pb2.PlanEpochResponse = call_rpc(self.stub.PlanEpoch, request)
        resp.spec.CopyFrom(self.spec)
        return resp

    def stream(self, request: ingest_pb2.StreamBatchesRequest, ring: Any) -> Any:
        call = self.stub.StreamBatches(request)

        class Call:
            def __iter__(self) -> Any:
                return stream_rpc(call)

            def cancel(self) -> Any:
                return call.cancel()
        return Call()

    def close(self) -> None:
        pass


def _requests(method: str) -> float:
    return sum(s.value for m in REGISTRY.collect() if m.name == "gristmill_rpc_requests"
               for s in m.samples if s.name.endswith("_total")
               and s.labels.get("method") == method)


def test_a_separate_ingest_asks_a_remote_annotate_once_per_batch(
        labelled: Labelled, fed: Running, tmp_path: Path) -> None:
    key = fed.key("reader")
    ingest = start_in_process(tmp_path / "ingest", services=("decode", "ingest"), ingest={
        "store_address": fed.address, "store_api_key": key,
        "annotate_address": fed.address, "annotate_api_key": key})
    try:
        before = _requests("GetAnnotations")
        batches = []
        for rank in (0, 1):
            with loader(ingest, rank=rank, world_size=2, annotations="v1") as ld:
                batches += epoch(ld)
        assert _requests("GetAnnotations") - before == len(batches)  # one call per batch
        fresh = check(batches, labelled.expected, labelled.rejected)
        assert sorted(fresh) == labelled.paths
        with pytest.raises(NotFound, match="v9"):
            loader(ingest, annotations="v9")
    finally:
        assert ingest.server is not None
        ingest.server.stop(0)


def test_an_unreachable_or_missing_annotate_service_is_a_clear_error(
        labelled: Labelled, fed: Running, tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    key = fed.key("reader")
    down = start_in_process(tmp_path / "down", services=("decode", "ingest"), ingest={
        "store_address": fed.address, "store_api_key": key, "annotate_address": dead})
    alone = start_in_process(tmp_path / "alone", services=("decode", "ingest"), ingest={
        "store_address": fed.address, "store_api_key": key})
    try:
        with pytest.raises(Unavailable, match=f"annotate service at {dead}") as info:
            loader(down, annotations="v1")
        assert info.value.reason == "ANNOTATE_UNAVAILABLE"
        with loader(down) as ld:  # streams without labels do not need it
            assert len(next(iter(ld))) == SMALL["batch_size"]
        with pytest.raises(FailedPrecondition, match="ingest.annotate_address"):
            loader(alone, annotations="v1")
    finally:
        for running in (down, alone):
            assert running.server is not None
            running.server.stop(0)


@pytest.mark.parametrize("policy", ["exact", "sequential"])  # sequential: planned as listed
def test_from_folder_reads_a_released_export(labelled: Labelled, fed: Running, photos: Path,
                                             tmp_path: Path, policy: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    export = tmp_path / "photos-v1.jsonl"
    with export.open("wb") as f:
        labelled.ann.export_release(DATASET, "v1", f)
    labelled.move_on()
    with Loader.from_folder(photos, annotations=export, show_progress=False, folder_index=False,
                            policy=policy, **SMALL) as ld:  # type: ignore[arg-type]
        assert ld.spec.release == "v1" and ld.spec.release_seq == labelled.release.seq
        fresh = check(epoch(ld), labelled.expected, labelled.rejected)
    assert sorted(fresh) == labelled.paths
    args = ["stream", str(photos), "--folder", "--batch-size", "4", "--image-size", "128",
            "--quiet", "--policy", policy]
    assert main([*args, "--annotations", str(export)]) == 0
    assert "6 of 22 samples had annotations (7 in all) at release v1" in capsys.readouterr().out
    assert main([*args, "--annotations", str(tmp_path / "missing.jsonl")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.jsonl" in err and "gristmill annotate export" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"format": "something else"}\n')
    with pytest.raises(InvalidArgument, match="not a release export"):
        Loader.from_folder(photos, annotations=bad, show_progress=False, **SMALL)  # type: ignore[arg-type]


def test_cli_streams_with_labels_and_fails_in_one_line(
        labelled: Labelled, fed: Running, capsys: pytest.CaptureFixture[str]) -> None:
    conn = ["--address", fed.address, "--api-key", fed.admin_key]
    args = ["stream", DATASET, *conn, "--batch-size", "4", "--image-size", "128", "--quiet",
            "--policy", "sequential"]
    assert main([*args, "--annotations", "v1", "--show-annotations", "100"]) == 0
    out = capsys.readouterr().out
    assert "annotations of release v1 (log position" in out
    shown = dict(re.findall(r"^  (\S+): (.*)$", out, re.MULTILINE))
    with_labels = sorted(path for path, found in labelled.expected.items() if found)
    assert sorted(shown) == with_labels  # each once (padding is not shown)
    assert len(re.findall(r"^  \S+: ", out, re.MULTILINE)) == len(with_labels)
    for sample, line in shown.items():
        assert line == "; ".join(f"{a['schema']} {json.dumps(a['data'])}"
                                 for a in labelled.expected[sample])
    assert "6 of 22 samples had annotations (7 in all) at release v1" in out
    assert main([*args, "--annotations", "v2"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no release 'v2'" in err and "Traceback" not in err


def test_stream_help_names_the_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["stream", "--help"])
    assert "--annotations RELEASE" in capsys.readouterr().out



def test_the_stream_examples_in_the_annotate_docs_run(server: Running, tmp_path: Path) -> None:
    """docs/annotate.md's stream section (```py and ```sh: the all-in-one server, not the
    annotate-only one test_annotate_cli runs the other examples against)."""
    text = (ROOT / "docs" / "annotate.md").read_text()
    section = text[text.index("## Labels in the training stream"):]
    python = re.findall(r"```py\n(.*?)```", section, flags=re.S)
    shell = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    assert python and shell
    make_sample_folder(tmp_path / "photos", count=6, max_side=256)
    env = dict(os.environ, GRISTMILL_ADDRESS=server.address, GRISTMILL_API_KEY=server.admin_key,
               GRISTMILL_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(ROOT),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for code in python:
        out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120, check=False)
        assert out.returncode == 0, f"example failed:\n{code}\n{out.stderr}"
    for script in shell:
        out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120, check=False)
        assert out.returncode == 0, f"example failed:\n{script}\n{out.stdout}\n{out.stderr}"
        assert "1 of 6 samples had annotations (1 in all) at release v1" in out.stdout
        assert ': label {"label": "cat"}\n' in out.stdout and "dog" not in out.stdout
