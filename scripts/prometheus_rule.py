"""Wrap deploy/monitoring/rules.yaml in a PrometheusRule for the Prometheus Operator.

    python scripts/prometheus_rule.py           # rewrite deploy/monitoring/prometheus-rule.yaml
    python scripts/prometheus_rule.py --check   # exit 1 if it is not what rules.yaml gives

The plain rule file is the source (promtool checks and tests it); the
PrometheusRule carries the same groups, so the two never drift apart.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

__all__ = ["RULES", "WRAPPED", "prometheus_rule"]

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "monitoring" / "rules.yaml"
WRAPPED = ROOT / "deploy" / "monitoring" / "prometheus-rule.yaml"
HEADER = ("# GENERATED from rules.yaml by scripts/prometheus_rule.py: edit rules.yaml, then run\n"
          "#   python scripts/prometheus_rule.py\n")


class _Dumper(yaml.SafeDumper):
    """Block literals for multi-line expressions."""


_Dumper.add_representer(str, lambda d, v: d.represent_scalar(
    "tag:yaml.org,2002:str", v, style="|" if "\n" in v else None))


def prometheus_rule(rules: dict[str, Any]) -> str:
    """The PrometheusRule manifest holding ``rules``' groups."""
    labels = {"app.kubernetes.io/part-of": "gristmill", "prometheus": "k8s",
              "role": "alert-rules"}
    doc = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
           "metadata": {"name": "gristmill", "labels": labels},
           "spec": {"groups": rules["groups"]}}
    return HEADER + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=1 << 16)


def main(argv: list[str] | None = None) -> int:
    """Write or check the wrapped rules."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check, write nothing")
    args = parser.parse_args(argv)
    text = prometheus_rule(yaml.safe_load(RULES.read_text()))
    if args.check:
        if not WRAPPED.exists() or WRAPPED.read_text() != text:
            print(f"{WRAPPED.relative_to(ROOT)} is stale: run python scripts/prometheus_rule.py",
                  file=sys.stderr)
            return 1
        return 0
    WRAPPED.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
