"""Render a kustomization directory to multi-document YAML (the subset gristmill uses).

    python scripts/k8s_render.py deploy/k8s/overlays/local > local.yaml

kustomize is neither a Debian 12 package nor one of this project's Python
dependencies, so ``make k8s-render`` uses this renderer of the features that
``deploy/k8s`` and ``deploy/monitoring`` use, with kustomize's meaning:
``resources`` (files and directories), ``namespace``, ``labels`` (``pairs``, on
metadata only), ``configMapGenerator`` (``files`` as ``[key=]path``,
``literals``, ``behavior`` create/replace/merge, ``options`` labels and
annotations; a content-hash suffix on the name, and every reference in pod
templates renamed to match), ``patches`` (strategic-merge files, several
documents each, ``$patch: delete``, a null deletes a field, lists of
containers, volumes, env, mounts and claim templates merged by their key, the
patch's items first as kustomize orders them) and ``images`` (``newName``,
``newTag``, ``digest``). Any other key is refused, so a kustomization that needs
more fails here loudly instead of rendering something different. Where
``kubectl kustomize`` is installed, the tests render every directory with both
and compare (names of generated ConfigMaps aside: the suffix is a hash of the
content, computed here in a way of our own).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["RenderError", "render", "render_yaml"]

Doc = dict[str, Any]

SUPPORTED = {"apiVersion", "kind", "namespace", "labels", "resources", "configMapGenerator",
             "patches", "images"}
#: Kinds that live outside namespaces (the ones gristmill could ship).
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume",
                  "StorageClass", "CustomResourceDefinition", "PriorityClass"}
#: kustomize's legacy output order: these kinds first, in this order, then the rest.
ORDER_FIRST = ["Namespace", "ResourceQuota", "StorageClass", "CustomResourceDefinition",
               "ServiceAccount", "PodSecurityPolicy", "Role", "ClusterRole", "RoleBinding",
               "ClusterRoleBinding", "ConfigMap", "Secret", "Endpoints", "Service", "LimitRange",
               "PriorityClass", "PersistentVolume", "PersistentVolumeClaim", "Deployment",
               "StatefulSet", "CronJob", "PodDisruptionBudget"]
ORDER_LAST = ["MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"]
#: Strategic-merge keys of the lists this renderer merges item by item.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name", "env": "name",
              "volumeMounts": "mountPath", "volumeClaimTemplates": "metadata.name"}
POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob"}


class RenderError(ValueError):
    """The kustomization uses something this renderer does not do, or is inconsistent."""


@dataclass
class _Resource:
    doc: Doc
    #: A ConfigMap from configMapGenerator: its name gets a content-hash suffix at the end.
    generated: bool = False


@dataclass
class _Result:
    resources: list[_Resource] = field(default_factory=list)

    def find(self, kind: str, name: str) -> _Resource:
        for r in self.resources:
            if r.doc.get("kind") == kind and r.doc["metadata"]["name"] == name:
                return r
        raise RenderError(f"no {kind} named {name} to patch or replace")


def _load_docs(path: Path) -> list[Doc]:
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except (OSError, yaml.YAMLError) as e:
        raise RenderError(f"cannot read {path}: {e}") from None
    for d in docs:
        if not isinstance(d, dict) or "kind" not in d:
            raise RenderError(f"{path}: every document must be a Kubernetes object with a kind")
    return docs


def _file_entries(base: Path, specs: list[str]) -> dict[str, str]:
    data: dict[str, str] = {}
    for spec in specs:
        key, _, rel = spec.rpartition("=")
        path = base / rel
        data[key or path.name] = path.read_text()
    return data


def _generate(base: Path, gen: Doc, result: _Result) -> None:
    unknown = set(gen) - {"name", "files", "literals", "behavior", "options"}
    if unknown:
        raise RenderError(f"configMapGenerator {gen.get('name')}: unsupported {sorted(unknown)}")
    data = _file_entries(base, gen.get("files", []))
    for literal in gen.get("literals", []):
        key, _, value = literal.partition("=")
        data[key] = value
    behavior = gen.get("behavior", "create")
    if behavior == "create":
        doc: Doc = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]},
                    "data": data}
        options = gen.get("options", {})
        if set(options) - {"labels", "annotations"}:
            raise RenderError(f"configMapGenerator {gen['name']}: options may only hold labels "
                              "and annotations here")
        for what in ("labels", "annotations"):
            if options.get(what):
                doc["metadata"][what] = dict(options[what])
        result.resources.append(_Resource(doc, generated=True))
        return
    target = result.find("ConfigMap", gen["name"])
    if behavior == "replace":
        target.doc["data"] = data
    elif behavior == "merge":
        target.doc.setdefault("data", {}).update(data)
    else:
        raise RenderError(f"configMapGenerator {gen['name']}: unknown behavior {behavior!r}")


def _key(item: Any, path: str) -> Any:
    for part in path.split("."):
        item = item.get(part) if isinstance(item, dict) else None
    return item


def _merge(base: Any, patch: Any, field_name: str = "") -> Any:
    """Strategic merge of ``patch`` into ``base`` (a new value; neither is changed)."""
    if isinstance(patch, dict) and isinstance(base, dict):
        if patch.get("$patch") == "replace":
            return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
        out = copy.deepcopy(base)
        for k, v in patch.items():
            if k == "$patch":
                continue
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = _merge(out[k], v, k)
            else:
                out[k] = copy.deepcopy(v)
        return out
    if isinstance(patch, list) and isinstance(base, list) and field_name in MERGE_KEYS:
        # like kustomize: the patch's items first, in its order (merged with the base's
        # item of the same key), then the base's items the patch does not name
        key = MERGE_KEYS[field_name]
        named = {_key(item, key) for item in patch}
        first: list[Any] = []
        for item in patch:
            if isinstance(item, dict) and item.get("$patch") == "delete":
                continue
            old = next((b for b in base if _key(b, key) == _key(item, key)), None)
            first.append(copy.deepcopy(item) if old is None else _merge(old, item))
        return first + [copy.deepcopy(b) for b in base if _key(b, key) not in named]
    return copy.deepcopy(patch)


def _apply_patches(base: Path, entries: list[Doc], result: _Result) -> None:
    for entry in entries:
        if set(entry) != {"path"}:
            raise RenderError(f"patches: only {{path: FILE}} (strategic merge) is supported, "
                              f"not {sorted(entry)}")
        for patch in _load_docs(base / entry["path"]):
            target = result.find(patch["kind"], patch["metadata"]["name"])
            if patch.get("$patch") == "delete":
                result.resources.remove(target)
            else:
                target.doc = _merge(target.doc, patch)


def _containers(doc: Doc) -> list[Doc]:
    spec = _pod_spec(doc)
    if spec is None:
        return []
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def _pod_spec(doc: Doc) -> Doc | None:
    if doc.get("kind") not in POD_KINDS:
        return None
    spec = doc.get("spec", {})
    if doc.get("kind") == "CronJob":  # its pods are its Jobs'
        spec = spec.get("jobTemplate", {}).get("spec", {})
    pod: Doc | None = spec.get("template", {}).get("spec")
    return pod


def _set_images(images: list[Doc], result: _Result) -> None:
    for rule in images:
        unknown = set(rule) - {"name", "newName", "newTag", "digest"}
        if unknown:
            raise RenderError(f"images: unsupported {sorted(unknown)}")
        for r in result.resources:
            for c in _containers(r.doc):
                image: str = c.get("image", "")
                name = image.split("@")[0]
                if ":" in name.rsplit("/", 1)[-1]:
                    name = name.rsplit(":", 1)[0]
                if name != rule["name"]:
                    continue
                new = rule.get("newName", name)
                if "digest" in rule:
                    c["image"] = f"{new}@{rule['digest']}"
                elif "newTag" in rule:
                    c["image"] = f"{new}:{rule['newTag']}"
                else:
                    c["image"] = new + image[len(name):]


def _build(directory: Path) -> _Result:
    kust_file = directory / "kustomization.yaml"
    try:
        kust = yaml.safe_load(kust_file.read_text()) or {}
    except OSError as e:
        raise RenderError(f"no kustomization.yaml in {directory}: {e.strerror}") from None
    unknown = set(kust) - SUPPORTED
    if unknown:
        raise RenderError(f"{kust_file}: this renderer does not support {sorted(unknown)}")
    result = _Result()
    for res in kust.get("resources", []):
        path = directory / res
        if path.is_dir():
            result.resources.extend(_build(path).resources)
        else:
            result.resources.extend(_Resource(d) for d in _load_docs(path))
    for gen in kust.get("configMapGenerator", []):
        _generate(directory, gen, result)
    _apply_patches(directory, kust.get("patches", []), result)
    _set_images(kust.get("images", []), result)
    if "namespace" in kust:
        for r in result.resources:
            if r.doc["kind"] not in CLUSTER_SCOPED:
                r.doc["metadata"]["namespace"] = kust["namespace"]
    for entry in kust.get("labels", []):
        if set(entry) - {"pairs"}:
            raise RenderError("labels: only pairs (on metadata, like kustomize's default) are "
                              "supported")
        for r in result.resources:
            r.doc["metadata"].setdefault("labels", {}).update(entry["pairs"])
    return result


def _suffix(doc: Doc) -> str:
    """A name suffix from a ConfigMap's content (kustomize's idea and alphabet)."""
    canonical = json.dumps({"kind": doc["kind"], "name": doc["metadata"]["name"],
                            "data": doc.get("data", {})}, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def _rename_references(doc: Doc, renamed: dict[str, str]) -> None:
    spec = _pod_spec(doc)
    if spec is None:
        return
    for volume in spec.get("volumes", []):
        refs = [volume.get("configMap")] + [
            s.get("configMap") for s in volume.get("projected", {}).get("sources", [])]
        for ref in refs:
            if ref and ref.get("name") in renamed:
                ref["name"] = renamed[ref["name"]]
    for c in _containers(doc):
        for env in c.get("env", []):
            ref = env.get("valueFrom", {}).get("configMapKeyRef")
            if ref and ref.get("name") in renamed:
                ref["name"] = renamed[ref["name"]]
        for source in c.get("envFrom", []):
            ref = source.get("configMapRef")
            if ref and ref.get("name") in renamed:
                ref["name"] = renamed[ref["name"]]


def _order(doc: Doc) -> tuple[int, str, str, str]:
    kind = doc["kind"]
    if kind in ORDER_FIRST:
        rank = ORDER_FIRST.index(kind)
    elif kind in ORDER_LAST:
        rank = len(ORDER_FIRST) + 1 + ORDER_LAST.index(kind)
    else:
        rank = len(ORDER_FIRST)
    meta = doc["metadata"]
    return rank, f"{doc.get('apiVersion', '')}/{kind}", meta.get("namespace", ""), meta["name"]


def render(directory: Path) -> list[Doc]:
    """The objects ``kubectl kustomize directory`` would print, in its order."""
    result = _build(Path(directory))
    renamed: dict[str, str] = {}
    for r in result.resources:
        if r.generated:
            old = r.doc["metadata"]["name"]
            renamed[old] = f"{old}-{_suffix(r.doc)}"
            r.doc["metadata"]["name"] = renamed[old]
    docs = [r.doc for r in result.resources]
    for doc in docs:
        _rename_references(doc, renamed)
    return sorted(docs, key=_order)


class _Dumper(yaml.SafeDumper):
    """Block literals for multi-line strings (config files stay readable)."""


_Dumper.add_representer(str, lambda d, v: d.represent_scalar(
    "tag:yaml.org,2002:str", v, style="|" if "\n" in v else None))


def render_yaml(directory: Path) -> str:
    """:func:`render` as multi-document YAML."""
    return "---\n".join(yaml.dump(d, Dumper=_Dumper, sort_keys=True, width=1 << 16)
                        for d in render(directory))


def main(argv: list[str] | None = None) -> int:
    """Command line: print the rendered directory."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="a directory with a kustomization.yaml")
    args = parser.parse_args(argv)
    try:
        sys.stdout.write(render_yaml(args.directory))
    except RenderError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
