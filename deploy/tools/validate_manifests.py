"""Validate rendered Kubernetes manifests against the Kubernetes JSON schemas, offline.

    python deploy/tools/validate_manifests.py -k 1.27.0 -k 1.37.0 rendered/*.yaml

Uses the schemas bundled in the kubernetes-validate package, in strict mode (unknown fields are
errors). Custom resources have no schema there: the kinds in SKIPPED_CRD_KINDS are skipped and
reported as skipped; any other kind without a schema is an error, so a typo in an apiVersion or
kind cannot pass unnoticed.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections import Counter
from pathlib import Path

import yaml
from kubernetes_validate import utils
from kubernetes_validate.version import __version__ as KV_VERSION

# (apiVersion, kind) of the custom resources the chart may render.
SKIPPED_CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),
    ("cert-manager.io/v1", "Certificate"),
}


# kubernetes-validate reads and parses the schema files (the definitions file is megabytes) for
# every object; they never change during a run.
utils.schema_contents = functools.lru_cache(maxsize=None)(utils.schema_contents)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", "--kubernetes-version", action="append", dest="versions", required=True)
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)

    failures: list[str] = []
    validated: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    for path in args.files:
        try:
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        except yaml.YAMLError as exc:
            failures.append(f"{path}: not valid YAML: {exc}")
            continue
        if not docs:
            failures.append(f"{path}: no objects rendered")
        for doc in docs:
            kind = doc.get("kind", "?")
            name = f"{path.name}: {kind}/{doc.get('metadata', {}).get('name', '?')}"
            if (doc.get("apiVersion"), kind) in SKIPPED_CRD_KINDS:
                skipped[kind] += 1
                continue
            for version in args.versions:
                try:
                    utils.validate(doc, version, strict=True)
                except utils.ValidationError as exc:
                    location = ".".join(str(p) for p in exc.path) or "(top)"
                    failures.append(f"{name} (Kubernetes {version}): {location}: {exc.message}")
                except utils.SchemaNotFoundError as exc:
                    failures.append(f"{name}: {exc.message}")
                except utils.VersionNotSupportedError:
                    failures.append(f"kubernetes-validate {KV_VERSION} has no schemas for {version}")
                    break
                else:
                    validated[kind] += 1

    for failure in failures:
        print(f"FAIL {failure}")
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(validated.items()))
    versions = ", ".join(args.versions)
    print(f"schemas: {sum(validated.values())} object validations passed against Kubernetes {versions} ({kinds})")
    if skipped:
        print(
            "schemas: skipped custom resources, not in the Kubernetes schemas: "
            + ", ".join(f"{k} {n}" for k, n in sorted(skipped.items()))
        )
    if failures:
        print(f"schemas: {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
