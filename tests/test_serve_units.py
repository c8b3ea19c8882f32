"""serve_app without Ray: config validation, checkpoint resolution, image decoding rules."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import spade_core
from spade_core.config import GeneratorConfig, LabelConfig, ModelConfig, SpadeConfig
from serve_app.checkpoints import resolve_checkpoint
from serve_app.config import ServeConfig, load_serve_config
from serve_app.images import Palette, RequestError, label_ids, parse_size, rgb_image

REPO = Path(__file__).resolve().parents[1]
TINY = ModelConfig(labels=LabelConfig(label_nc=6), generator=GeneratorConfig(ngf=8, crop_size=64, spade=SpadeConfig(hidden=8)))


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")  # uint16 arrays become 16-bit PNGs
    return buf.getvalue()


# --- config -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data,message",
    [
        ({}, "give either checkpoint .one model. or models"),
        ({"checkpoint": "x", "generatr": {}}, "unknown key generatr"),
        ({"checkpoint": "x", "generator": {"num_gpus": -1}}, "generator.num_gpus must be >= 0"),
        ({"checkpoint": "x", "ingress": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}}, "ingress.autoscaling.max_replicas"),
        ({"checkpoint": "x", "encoder": {"max_ongoing_requests": "many"}}, "encoder.max_ongoing_requests has a wrong value"),
        ({"checkpoint": "x", "precision": "int8"}, "precision has a wrong value"),
        ({"checkpoint": "x", "batching": {"max_batch_size": 64}}, "batches can never fill"),
        ({"checkpoint": "x", "limits": {"max_body_bytes": 0}}, "limits.max_body_bytes must be >= 1"),
    ],
)
def test_bad_serve_configs_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ServeConfig.from_dict(data)


def test_the_cluster_serve_yaml_args_are_a_valid_config() -> None:
    doc = yaml.safe_load((REPO / "cluster/serve/spade.yaml").read_text())
    (app,) = doc["applications"]
    assert app["import_path"] == "serve_app.app:build_app"
    config = ServeConfig.from_dict(app["args"])
    assert config.generator.num_gpus == 1 and config.generator.autoscaling.max_replicas > 1
    assert config.ingress.max_ongoing_requests >= config.batching.max_batch_size * config.generator.autoscaling.max_replicas


def test_load_serve_config_overrides_and_keywords(tmp_path: Path) -> None:
    path = tmp_path / "args.yaml"
    path.write_text("checkpoint: /ckpt\nprecision: fp32\nbatching: {max_batch_size: 4}\n")
    config = load_serve_config(path, ["batching.batch_wait_timeout_s=0.2", "generator.autoscaling.max_replicas=3"], precision="bf16")
    assert (config.precision, config.batching.max_batch_size, config.batching.batch_wait_timeout_s) == ("bf16", 4, 0.2)
    assert config.generator.ray_options()["autoscaling_config"]["max_replicas"] == 3
    with pytest.raises(ValueError, match="unknown key batching.size"):
        load_serve_config(path, ["batching.size=3"])


# --- checkpoints ----------------------------------------------------------------------------


def test_a_run_directory_resolves_to_its_newest_checkpoint(tmp_path: Path) -> None:
    model = spade_core.build_model(TINY, discriminator=False, seed=0)
    for name in ("checkpoint_2026-01-01_10-00-00.000000", "checkpoint_2026-01-02_09-00-00.000000"):
        spade_core.save_checkpoint(model, tmp_path / "run" / name)
    (tmp_path / "run" / "checkpoint_2026-01-03_00-00-00.000000").mkdir()  # an unfinished upload: no config.json
    assert resolve_checkpoint(str(tmp_path / "run")).name == "checkpoint_2026-01-02_09-00-00.000000"
    assert resolve_checkpoint(f"file://{tmp_path}/run").name == "checkpoint_2026-01-02_09-00-00.000000"
    with pytest.raises(ValueError, match="does not exist"):
        resolve_checkpoint(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a checkpoint directory"):
        resolve_checkpoint(str(tmp_path / "empty"))


def test_the_best_checkpoint_of_a_run_is_served_only_when_selected(tmp_path: Path) -> None:
    run = tmp_path / "run"
    newest = spade_core.save_checkpoint(spade_core.build_model(TINY, discriminator=False, seed=0), run / "checkpoint_2026-01-02_09-00-00.000000")
    with pytest.raises(ValueError, match="has no best.json.*checkpoint.best_by"):
        resolve_checkpoint(str(run), "best")
    spade_core.save_checkpoint(spade_core.build_model(TINY, discriminator=False, seed=1), run / "best")
    (run / "best.json").write_text(json.dumps({"metric": "fid", "value": 30.0, "step": 4, "checkpoint": "best"}))
    assert resolve_checkpoint(str(run)) == newest  # the default stays the newest
    assert resolve_checkpoint(str(run), "best") == run / "best"
    assert resolve_checkpoint(f"file://{run}", "best") == run / "best"
    with pytest.raises(ValueError, match="is a checkpoint, not a training run"):
        resolve_checkpoint(str(newest), "best")
    (run / "best.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a best-checkpoint record"):
        resolve_checkpoint(str(run), "best")


# --- images ---------------------------------------------------------------------------------


def test_label_maps_single_channel_16_bit_palette_and_rgb() -> None:
    palette = Palette(((0, 0, 0), (255, 0, 0), (0, 255, 0)))
    ids = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    assert np.array_equal(label_ids(png(ids), field="labels", palette=palette, max_pixels=100), ids)
    assert np.array_equal(label_ids(png(ids.astype(np.uint16) * 300), field="labels", palette=palette, max_pixels=100), ids.astype(np.int64) * 300)
    rgb = np.array(palette.colors, dtype=np.uint8)[ids]
    assert np.array_equal(label_ids(png(rgb), field="labels", palette=palette, max_pixels=100), ids)
    with pytest.raises(RequestError, match="not in the model's palette") as err:
        label_ids(png(np.full((2, 2, 3), 7, np.uint8)), field="labels", palette=palette, max_pixels=100)
    assert err.value.status == 400 and "#070707" in err.value.message
    rgba = np.concatenate([rgb, np.full((2, 2, 1), 128, np.uint8)], axis=2)
    with pytest.raises(RequestError, match="transparent"):
        label_ids(png(rgba), field="labels", palette=palette, max_pixels=100)


def test_pixel_cap_is_checked_before_decoding() -> None:
    data = png(np.zeros((300, 300), np.uint8))
    with pytest.raises(RequestError, match="90000 pixels") as err:
        label_ids(data, field="labels", palette=Palette(((0, 0, 0),)), max_pixels=1000)
    assert err.value.status == 413
    with pytest.raises(RequestError) as err:
        rgb_image(b"GIF89a" + b"\0" * 20, field="style", max_pixels=1000)
    assert err.value.status == 400


def test_nearest_id_resize_matches_torch_interpolate() -> None:
    import torch
    import torch.nn.functional as F

    from spade_core.model import resize_ids

    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 50, (37, 53)))
    for size in [(64, 64), (20, 90), (37, 53)]:
        want = F.interpolate(ids[None, None].float(), size=size, mode="nearest")[0, 0].long()
        assert torch.equal(resize_ids(ids, size), want) and torch.equal(resize_ids(ids[None], size)[0], want)


def test_output_size_parsing() -> None:
    assert parse_size(None, original=(30, 40), model=(64, 64), max_side=100) == (64, 64)
    assert parse_size("original", original=(30, 40), model=(64, 64), max_side=100) == (30, 40)
    assert parse_size("80x20", original=(30, 40), model=(64, 64), max_side=100) == (20, 80)
    for bad in ("80", "axb", "0x10", "101x5"):
        with pytest.raises(RequestError):
            parse_size(bad, original=(30, 40), model=(64, 64), max_side=100)


def test_uri_checkpoints_are_copied_to_the_cache_newest_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A URI goes through pyarrow's filesystems (file:// here; s3:// and gs:// the same way)."""
    import serve_app.checkpoints as checkpoints

    monkeypatch.setattr(checkpoints, "CACHE_DIR", tmp_path / "cache")
    model = spade_core.build_model(TINY, discriminator=False, seed=0)
    for name in ("checkpoint_2026-01-01_10-00-00.000000", "checkpoint_2026-01-02_09-00-00.000000"):
        spade_core.save_checkpoint(model, tmp_path / "run" / name)
    local = checkpoints._download(f"file://{tmp_path}/run", "latest")
    assert local.name == "checkpoint_2026-01-02_09-00-00.000000" and (local / "config.json").is_file()
    assert not any(p.name.startswith("checkpoint_2026-01-01") for p in (tmp_path / "cache").rglob("*"))
    assert checkpoints._download(f"file://{tmp_path}/run", "latest") == local  # cached
    loaded, identity = checkpoints.load_model(str(local))
    assert loaded.config == TINY and identity.startswith(str(local))
    with pytest.raises(ValueError, match="does not exist"):
        checkpoints._download(f"file://{tmp_path}/missing", "latest")
    with pytest.raises(ValueError, match="has no best.json"):
        checkpoints._download(f"file://{tmp_path}/run", "best")
    # The best copy: fetched alone, and fetched again when training replaced it.
    best_model = spade_core.build_model(TINY, discriminator=False, seed=3)
    spade_core.save_checkpoint(best_model, tmp_path / "run" / "best")
    (tmp_path / "run" / "best.json").write_text(json.dumps({"metric": "fid", "value": 30.0, "step": 4, "checkpoint": "best"}))
    best = checkpoints._download(f"file://{tmp_path}/run", "best")
    assert best.parent == local.parent and (best / "config.json").is_file() and not (best / "checkpoint_2026-01-02_09-00-00.000000").exists()
    (tmp_path / "run" / "best.json").write_text(json.dumps({"metric": "fid", "value": 20.0, "step": 8, "checkpoint": "best"}))
    assert checkpoints._download(f"file://{tmp_path}/run", "best") != best
    with pytest.raises(ValueError, match="is a checkpoint, not a training run"):
        checkpoints._download(f"file://{local}", "best")


def test_nvlabs_directories_are_served_as_they_are(nvlabs_fixture: Path) -> None:
    assert resolve_checkpoint(str(nvlabs_fixture / "checkpoint")) == nvlabs_fixture / "checkpoint"


def test_spade_serve_refuses_a_bad_checkpoint_before_starting_ray(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from serve_app.__main__ import main

    assert main(["--checkpoint", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    spade_core.save_checkpoint(spade_core.build_model(TINY, discriminator=False, seed=0), tmp_path / "run" / "checkpoint_2026-01-01_00-00-00.000000")
    assert main(["--checkpoint", str(tmp_path / "run"), "--select", "best"]) == 2
    assert "has no best.json" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path), "--set", "batching.max_batch_size=0"]) == 2
    assert "batching.max_batch_size must be >= 1" in capsys.readouterr().err


def test_replica_health_check_probes_an_idle_model_and_fails_a_stuck_batch(tmp_path: Path) -> None:
    """What Serve's health check calls (outside Ray here): no model -> unhealthy; an idle
    replica runs a tiny inference; a batch running past the timeout -> unhealthy, so Serve
    replaces the replica; a model that cannot run -> unhealthy."""
    import asyncio
    import time

    from serve_app.deployments import SpadeGenerator

    spade_core.save_checkpoint(spade_core.build_model(TINY, discriminator=False, seed=0), tmp_path / "ckpt")
    from serve_app.config import BatchingConfig, ReplicaSettings

    settings = ReplicaSettings(device="cpu", precision="fp32", compile=False, batching=BatchingConfig(max_batch_size=4, batch_wait_timeout_s=0.0),
                               max_models=2, health_check_period_s=0.01, health_check_timeout_s=0.5)
    replica = SpadeGenerator.func_or_class(settings)

    async def scenario() -> None:
        with pytest.raises(RuntimeError, match="no model loaded"):
            await replica.check_health()
        await replica.reconfigure({"checkpoint": str(tmp_path / "ckpt")})
        await replica.check_health()  # idle: the probe runs a 1-image inference
        await replica.reconfigure({"checkpoint": str(tmp_path / "ckpt"), "select": "best"})  # a broken rollout
        assert replica.table == {"default": (str(tmp_path / "ckpt"), "latest")}  # the old model keeps serving
        assert "is a checkpoint, not a training run" in replica.load_errors["default"]
        replica._busy_since = time.monotonic() - 1.0
        with pytest.raises(RuntimeError, match="running for more than 0.5 s"):
            await replica.check_health()
        replica._busy_since = None
        replica._probed.model._fast = None  # break the model: the probe must notice
        replica._probed.model.generator.fc = None
        time.sleep(0.02)
        with pytest.raises(Exception):
            await replica.check_health()

    asyncio.run(scenario())

