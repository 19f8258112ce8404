"""`make demo`: the all-in-one server end to end on a temporary data directory.

Starts `gristmill serve` (filesystem storage, every installed service, one
port), then, as a user would with the CLI: creates a dataset, imports a folder
of photo-like JPEG/PNG images, lists and inspects it, commits a version,
downloads it back and checks every byte, decodes every image into aspect-ratio
buckets on the server, streams one epoch to two training ranks (two
processes) with an exactly-once audit and a contact sheet of each rank's
first batch (in demo-output/), labels two images through the annotate service
(a schema, two proposals, one accepted and one rejected, a release) and
streams with the released labels, shows a few Prometheus metrics, and stops
the server with SIGTERM (a clean, graceful exit).

With STORAGE=ceph (``make demo STORAGE=ceph``) the store keeps its objects in a
throw-away single-node Ceph cluster that the demo brings up with
deploy/local/ceph-up and stops with deploy/local/ceph-down.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.processes import start_and_wait  # noqa: E402
from scripts.sample_data import make_sample_folder  # noqa: E402

GRISTMILL = str(Path(sys.executable).parent / "gristmill")
#: Contact sheets land here (kept after the demo).
OUT = Path(os.environ.get("GRISTMILL_DEMO_OUT", ROOT / "demo-output"))


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def cli(*args: str, env: dict[str, str]) -> str:
    print("$ gristmill " + " ".join(args), flush=True)
    out = subprocess.run([GRISTMILL, *args], env=env, capture_output=True, text=True,
                         check=False)
    print(out.stdout, end="", flush=True)
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"demo failed: gristmill {' '.join(args)} exited {out.returncode}")
    return out.stdout


@contextlib.contextmanager
def storage_flags(storage: str) -> Iterator[list[str]]:
    """`gristmill serve` flags for the storage; a local Ceph cluster for "ceph"."""
    if storage == "fs":
        yield []
        return
    if storage != "ceph":
        raise SystemExit(f"STORAGE must be fs or ceph, not {storage!r}")
    # the daemons' admin sockets need a short directory
    cluster = Path(tempfile.mkdtemp(prefix="gmdemo-ceph-", dir="/tmp"))
    step(f"bringing up a single-node Ceph cluster: deploy/local/ceph-up {cluster}")
    up = subprocess.run([str(ROOT / "deploy/local/ceph-up"), str(cluster)], text=True,
                        capture_output=True, check=False, env=dict(os.environ, CEPH_MGR="0"))
    if up.returncode != 0:
        sys.stderr.write(up.stderr)
        shutil.rmtree(cluster, ignore_errors=True)
        raise SystemExit("demo failed: ceph-up could not start a cluster (see above)")
    conf = up.stdout.strip().splitlines()[-1]
    print(f"cluster conf: {conf}")
    try:
        yield ["--storage", "ceph", "--ceph-conf", conf, "--ceph-pool", "gristmill"]
        objects = subprocess.run(["rados", "--conf", conf, "-p", "gristmill", "ls"],
                                 text=True, capture_output=True, check=False).stdout.split()
        print(f"the pool holds {len(objects)} RADOS objects "
              f"({sum(o.startswith('blobs/') for o in objects)} blobs)")
    finally:
        step(f"stopping the cluster: deploy/local/ceph-down {cluster}")
        subprocess.run([str(ROOT / "deploy/local/ceph-down"), str(cluster)], check=False,
                       capture_output=True)
        shutil.rmtree(cluster, ignore_errors=True)


def main() -> int:
    storage = os.environ.get("STORAGE") or "fs"
    with tempfile.TemporaryDirectory(prefix="gristmill-demo-") as tmp, \
            storage_flags(storage) as flags:
        work = Path(tmp)
        data, images, ready = work / "data", work / "images", work / "ready.json"
        step(f"preparing 24 photo-like images (JPEG and PNG, mixed sizes) in {images}")
        paths = make_sample_folder(images, count=24)
        print(f"{len(paths)} files, {sum(p.stat().st_size for p in paths) / 1e6:.1f} MB")

        step("starting the all-in-one server: gristmill serve --data ... --port 0 "
             + " ".join(flags))
        server = start_and_wait([GRISTMILL, "serve", "--data", str(data), "--port", "0",
                                 "--metrics-port", "0", "--ready-file", str(ready), *flags],
                                ready, log=work / "server.log")
        try:
            info = json.loads(ready.read_text())
            print(f"serving on 127.0.0.1:{info['port']}, metrics on :{info['metrics_port']}; "
                  f"admin key in {data / 'admin.key'}")
            env = dict(os.environ, GRISTMILL_ADDRESS=f"127.0.0.1:{info['port']}",
                       GRISTMILL_API_KEY=(data / "admin.key").read_text().strip(),
                       GRISTMILL_CACHE_DIR=str(work / "cache"))

            step("create, import, list")
            cli("dataset", "create", "demo-photos", "--description", "photo-like samples",
                env=env)
            cli("dataset", "import", "demo-photos", str(images), env=env)
            cli("dataset", "import", "demo-photos", str(images), env=env)  # all skipped
            cli("dataset", "list", env=env)

            step("manifest (sizes read from headers, no decoding) and an immutable version")
            manifest = cli("dataset", "manifest", "demo-photos", env=env)
            assert manifest.count("\n") == len(paths) + 1
            cli("dataset", "commit", "demo-photos", env=env)
            cli("dataset", "show", "demo-photos", env=env)

            step("download and verify every byte")
            out = work / "downloaded"
            cli("dataset", "download", "demo-photos", str(out), env=env)
            for p in paths:
                rel = p.relative_to(images)
                if (out / rel).read_bytes() != p.read_bytes():
                    raise SystemExit(f"demo failed: {rel} differs after download")
            print(f"all {len(paths)} files identical")

            step("decode into aspect-ratio buckets (S=512, d=16) on the server, by reference")
            cli("decode", "buckets", "--image-size", "512", "--downsampling", "16", env=env)
            decoded = work / "decoded"
            cli("decode", "dataset", "demo-photos", "--out", str(decoded), "--strict", env=env)
            pngs = sorted(decoded.rglob("*.png"))
            if len(pngs) != len(paths):
                raise SystemExit(f"demo failed: {len(pngs)} decoded images for {len(paths)} "
                                 "files")
            print(f"{len(pngs)} bucketed images written under {decoded}")

            step("train: two ranks (two processes) stream one epoch, S=512 d=16, batch 4")
            log = work / "deliveries"
            ranks = [subprocess.Popen(
                [GRISTMILL, "stream", "demo-photos", "--rank", str(r), "--world-size", "2",
                 "--batch-size", "4", "--image-size", "512", "--downsampling", "16",
                 "--seed", "1", "--delivery-log", str(log), "--strict",
                 "--contact-sheet", str(OUT / f"contact-sheet-rank{r}.png")],
                env=env, stdout=subprocess.PIPE, text=True) for r in range(2)]
            for r, proc in enumerate(ranks):
                text, _ = proc.communicate(timeout=300)
                print(text, end="", flush=True)
                if proc.returncode != 0:
                    raise SystemExit(f"demo failed: rank {r} exited {proc.returncode}")
            step("exactly-once audit of both ranks' delivery logs")
            cli("audit", str(log), env=env)

            step("annotate: a schema, two proposals, a review, a release")
            schema = work / "label.json"
            schema.write_text('{"type": "object", "properties": {"label": {"type": "string"}}, '
                              '"required": ["label"]}')
            cli("annotate", "init", "demo-photos", env=env)
            cli("annotate", "schema", "add", "demo-photos", "label", str(schema), env=env)
            good, bad = (p.relative_to(images).as_posix() for p in paths[:2])
            ids = [cli("annotate", "propose", "demo-photos", "--schema", "label", "--sample",
                       sample, "--payload", json.dumps({"label": label}),
                       env=env).splitlines()[-1]
                   for sample, label in ((good, "golden hour"), (bad, "blurry cat"))]
            cli("annotate", "review", "demo-photos", ids[0], "--accept", env=env)
            cli("annotate", "review", "demo-photos", ids[1], "--reject", "--reason",
                "not a cat", env=env)
            cli("annotate", "release", "demo-photos", "v1", env=env)
            cli("annotate", "propose", "demo-photos", "--schema", "label", "--sample", bad,
                "--payload", '{"label": "after the release"}', env=env)  # not in v1

            step("train with labels: each batch carries its samples' labels at release v1")
            streamed = cli("stream", "demo-photos", "--annotations", "v1", "--batch-size", "4",
                           "--image-size", "256", "--show-annotations", "2", "--quiet", env=env)
            wanted = [f'{good}: label {{"label": "golden hour"}}',
                      "1 of 24 samples had annotations (1 in all) at release v1"]
            if not all(w in streamed for w in wanted) or "blurry" in streamed \
                    or "after the release" in streamed:
                raise SystemExit("demo failed: the stream did not carry exactly the accepted "
                                 "label of release v1")

            step("Prometheus metrics")
            with urllib.request.urlopen(f"http://127.0.0.1:{info['metrics_port']}/metrics",
                                        timeout=10) as r:
                text = r.read().decode()
            for line in text.splitlines():
                if line.startswith(("gristmill_rpc_requests_total{", "gristmill_store_bytes_",
                                    "gristmill_decode_samples_total",
                                    "gristmill_ingest_samples_total",
                                    "gristmill_ingest_bytes_out_total",
                                    "gristmill_annotate_events_appended_total{")) \
                        and "_created" not in line:
                    print("  " + line)
        finally:
            step("stopping the server with SIGTERM (graceful)")
            server.send_signal(signal.SIGTERM)
            code = server.wait(60)
        print(f"server exited with {code}")
        if code != 0:
            print((work / "server.log").read_text(), file=sys.stderr)
            return 1
    print("\ndemo finished: all good")
    return 0


if __name__ == "__main__":
    sys.exit(main())
