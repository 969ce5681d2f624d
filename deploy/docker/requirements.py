#!/usr/bin/env python3
"""Print apexrank's runtime requirements (core dependencies plus the named extras) from pyproject.toml.

The Dockerfiles install these in a layer of their own before the source is copied, so that a code
change does not reinstall torch. Usage: ``python requirements.py PYPROJECT [EXTRA ...]``.
Self-references such as ``apexrank[embedded,cpu]`` (the dev extra) are skipped.
"""

from __future__ import annotations

import sys
import tomllib


def requirements(pyproject: str, extras: list[str]) -> list[str]:
    with open(pyproject, "rb") as fh:
        project = tomllib.load(fh)["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"unknown extra(s) {unknown}; pyproject.toml defines {sorted(optional)}")
    reqs = list(project.get("dependencies", []))
    for extra in extras:
        reqs.extend(optional[extra])
    name = project["name"]
    return [r for r in dict.fromkeys(reqs) if not r.replace(" ", "").startswith((f"{name}[", f"{name}="))]


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    print("\n".join(requirements(argv[0], argv[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
