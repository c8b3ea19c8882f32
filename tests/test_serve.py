"""serve_app over real HTTP: a local Serve with three apps on tiny checkpoints.

``/`` serves a VAE model (generator + style encoder), ``/plain`` a model without encoder,
``/strict`` the plain model with tight limits, bearer auth, a one-request queue and slow
batches (for 401 / 408 / 413 / 503).
"""

from __future__ import annotations

import io
import json
import socket
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import spade_core
from spade_core.config import DiscriminatorConfig, EncoderConfig, GeneratorConfig, LabelConfig, ModelConfig, SpadeConfig
from spade_core.testing import randomize_weights

pytestmark = pytest.mark.slow
requests = pytest.importorskip("requests")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # drills, hostile_images
TOKEN_ENV = "SPADE_TEST_SERVE_TOKEN"  # set for the whole Ray cluster in conftest.RAY_ENV
D = DiscriminatorConfig(ndf=8, n_layers=2, num_D=1)
VAE = ModelConfig(
    labels=LabelConfig(label_nc=12),
    generator=GeneratorConfig(ngf=8, crop_size=64, z_dim=16, spade=SpadeConfig(hidden=16)),
    encoder=EncoderConfig(ndf=8, z_dim=16, input_size=64),
    discriminator=D,
)
PLAIN = ModelConfig(
    labels=LabelConfig(label_nc=12), generator=GeneratorConfig(ngf=8, crop_size=64, aspect_ratio=2.0, spade=SpadeConfig(hidden=16)),
    discriminator=D,
)
# ~0.1 s per image on this CPU: slow enough for a burst to overflow a one-request queue
SLOW = ModelConfig(
    labels=LabelConfig(label_nc=12), generator=GeneratorConfig(ngf=16, crop_size=256, spade=SpadeConfig(hidden=32)), discriminator=D
)
SMALL = {"num_cpus": 0.1}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_model(config: ModelConfig, path: Path, seed: int) -> spade_core.SpadeModel:
    model = randomize_weights(spade_core.build_model(config, seed=seed), seed=seed + 1).eval()
    spade_core.save_checkpoint(model, path)
    return model


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def expected_image(model: spade_core.SpadeModel, labels: np.ndarray, **kwargs: object) -> np.ndarray:
    out = model.synthesize(torch.from_numpy(labels.astype(np.int64))[None], **kwargs)
    return ((out.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()


def decode(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)).convert("RGB"))


def deploy(apps: list[dict]) -> None:
    """Deploy a multi-app Serve config as `serve deploy` does (the declarative API, where a
    change of a deployment's user_config alone reconfigures its running replicas)."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    _get_global_client().deploy_apps(ServeDeploySchema.model_validate({"applications": apps}), _blocking=False)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        status = serve.status().applications
        states = {a["name"]: status[a["name"]].status if a["name"] in status else "MISSING" for a in apps}
        if all(v == "RUNNING" for v in states.values()):
            return
        failed = {k: status[k].message for k, v in states.items() if v in ("DEPLOY_FAILED", "UNHEALTHY")}
        assert not failed, failed
        time.sleep(0.5)
    raise AssertionError(f"apps not running after 240 s: {states}")


def application(name: str, prefix: str, args: dict, deployments: list[dict] | None = None) -> dict:
    app = {"name": name, "route_prefix": prefix, "import_path": "serve_app.app:build_app", "args": args}
    return {**app, "deployments": deployments} if deployments else app


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory):  # type: ignore[no-untyped-def]
    from ray import serve

    root = tmp_path_factory.mktemp("serve")
    models = {
        "vae": write_model(VAE, root / "vae", seed=1),
        "plain": write_model(PLAIN, root / "plain", seed=3),
        "plain2": write_model(PLAIN, root / "plain2", seed=5),
        "slow": write_model(SLOW, root / "slow", seed=7),
    }
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    batching = {"max_batch_size": 8, "batch_wait_timeout_s": 0.3}  # long enough for concurrent requests to meet
    strict = {
        "checkpoint": str(root / "slow"), "ingress": SMALL, "auth_token_env": TOKEN_ENV,
        "generator": {**SMALL, "max_ongoing_requests": 1, "max_queued_requests": 1},
        "batching": {"max_batch_size": 1, "batch_wait_timeout_s": 0.0},
        "limits": {"max_body_bytes": 4000, "request_timeout_s": 5.0, "retry_after_s": 7},
    }
    apps = [
        application("vae", "/", {"checkpoint": str(root / "vae"), "generator": SMALL, "encoder": SMALL, "ingress": SMALL,
                                 "batching": batching, "limits": {"max_pixels": 600 * 600}}),
        application("plain", "/plain", {"checkpoint": str(root / "plain"), "generator": SMALL, "ingress": SMALL, "batching": batching}),
        application("strict", "/strict", strict),
        application("timeout", "/timeout", {"checkpoint": str(root / "slow"), "ingress": SMALL, "generator": SMALL,
                                            "limits": {"request_timeout_s": 0.02}}),
    ]
    deploy(apps)
    yield {"url": f"http://127.0.0.1:{port}", "models": models, "root": root, "apps": apps}
    serve.shutdown()


def labels_map(h: int = 40, w: int = 50, seed: int = 0, classes: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, (h, w)).astype(np.uint8)


def post(url: str, files: dict, data: dict | None = None, **kwargs: object) -> requests.Response:
    return requests.post(url, files={k: (f"{k}.png", v, "application/octet-stream") for k, v in files.items()}, data=data, timeout=60, **kwargs)


# --- correctness ----------------------------------------------------------------------------


def test_synthesis_equals_the_model_with_a_style_image(server) -> None:  # type: ignore[no-untyped-def]
    labels = labels_map()
    style = (np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)
    r = post(server["url"] + "/v1/synthesize", {"labels": png(labels), "style": png(style)})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    style_t = torch.from_numpy(style).permute(2, 0, 1)[None].float() / 255 * 2 - 1
    want = expected_image(server["models"]["vae"], labels, style=style_t)
    got = decode(r.content)
    assert got.shape == want.shape == (64, 64, 3)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # PNG is lossless; fast path rounding


def test_encode_then_style_code_gives_the_same_image_and_seeds_are_reproducible(server) -> None:  # type: ignore[no-untyped-def]
    url = server["url"]
    labels = png(labels_map(seed=2))
    style = png((np.random.default_rng(3).random((80, 70, 3)) * 255).astype(np.uint8))
    code = requests.post(url + "/v1/encode", files={"style": ("s.png", style, "image/png")}, timeout=60)
    assert code.status_code == 200, code.text
    assert len(code.json()["mu"]) == len(code.json()["logvar"]) == 16
    by_style = post(url + "/v1/synthesize", {"labels": labels, "style": style})
    by_code = post(url + "/v1/synthesize", {"labels": labels}, data={"style_code": json.dumps(code.json())})
    assert by_style.status_code == by_code.status_code == 200
    assert np.array_equal(decode(by_style.content), decode(by_code.content))
    a, b, c = (post(url + "/v1/synthesize", {"labels": labels}, data={"seed": s}) for s in (7, 7, 8))
    assert np.array_equal(decode(a.content), decode(b.content))
    assert not np.array_equal(decode(a.content), decode(c.content))
    assert a.headers["X-Seed"] == "7"
    fresh = post(url + "/v1/synthesize", {"labels": labels})  # no seed: a fresh one, said, so the draw can be repeated
    again = post(url + "/v1/synthesize", {"labels": labels}, data={"seed": fresh.headers["X-Seed"]})
    assert np.array_equal(decode(fresh.content), decode(again.content))
    assert "X-Seed" not in by_style.headers  # z = the style's mu: nothing was drawn


def test_a_seed_draws_the_same_image_over_http_as_in_python(server) -> None:  # type: ignore[no-untyped-def]
    """SpadeModel.sample_z is the one place a seed becomes z: the API and a notebook agree."""
    labels = labels_map(seed=5)
    r = post(server["url"] + "/v1/synthesize", {"labels": png(labels)}, data={"seed": 11})
    assert r.status_code == 200, r.text
    want = expected_image(server["models"]["vae"], labels, seed=11)
    assert np.abs(decode(r.content).astype(int) - want.astype(int)).max() <= 1


def test_plain_model_rgb_palette_size_and_formats(server) -> None:  # type: ignore[no-untyped-def]
    url = server["url"] + "/plain"
    labels = labels_map(30, 90, seed=4)
    model = server["models"]["plain"]
    r = post(url + "/v1/synthesize", {"labels": png(labels)})
    assert r.status_code == 200, r.text
    want = expected_image(model, labels)
    assert decode(r.content).shape == (32, 64, 3)  # crop 64 wide, aspect ratio 2
    assert np.abs(decode(r.content).astype(int) - want.astype(int)).max() <= 1
    colors = np.array(model.classes.colors, dtype=np.uint8)[labels]  # the same map as palette colours
    rgb = post(url + "/v1/synthesize", {"labels": png(colors)})
    assert np.array_equal(decode(rgb.content), decode(r.content))
    original = post(url + "/v1/synthesize", {"labels": png(labels)}, data={"size": "original", "format": "jpeg"})
    assert original.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(original.content)).size == (90, 30)
    webp = post(url + "/v1/synthesize", {"labels": png(labels)}, data={"size": "100x50", "format": "webp"})
    assert webp.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(webp.content)).size == (100, 50)
    info = requests.get(url + "/v1/model", timeout=30).json()
    assert info["input_size"] == {"height": 32, "width": 64}
    assert info["style"]["encoder"] is False and len(info["classes"]) == 13  # 12 + don't care channel
    assert requests.get(server["url"] + "/readyz", timeout=30).status_code == 200
    assert requests.get(server["url"] + "/docs", timeout=30).status_code == 200


def test_concurrent_requests_are_merged_into_batches(server) -> None:  # type: ignore[no-untyped-def]
    url = server["url"] + "/plain/v1/synthesize"
    bodies = [png(labels_map(seed=10 + i)) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda b: post(url, {"labels": b}), bodies))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    sizes = [int(r.headers["x-batch-size"]) for r in responses]
    assert max(sizes) >= 4, sizes
    # merged or not, each client gets its own image
    model = server["models"]["plain"]
    for body, r in zip(bodies[:3], responses[:3]):
        want = expected_image(model, np.asarray(Image.open(io.BytesIO(body))))
        assert np.abs(decode(r.content).astype(int) - want.astype(int)).max() <= 1


# --- bad input -----------------------------------------------------------------------------


def bomb_png() -> bytes:
    return png(np.zeros((700, 700), dtype=np.uint8))  # 490,000 pixels > the app's 360,000 cap


BAD = [
    ("not an image", {"labels": b"hello, not a PNG"}, {}, 400, "not an image"),
    ("truncated PNG", {"labels": png(labels_map())[:60]}, {}, 400, "truncated"),
    ("JPEG label map", {"labels": None}, {}, 415, "JPEG"),
    ("pixel bomb", {"labels": bomb_png()}, {}, 413, "pixels"),
    ("two channels", {"labels": None}, {}, 400, "LA"),
    ("ids out of range", {"labels": np.full((20, 20), 40, np.uint8)}, {}, 400, "outside the model's classes"),
    ("colour not in palette", {"labels": np.full((8, 8, 3), (1, 2, 3), np.uint8)}, {}, 400, "palette"),
    ("bad style code", {"labels": labels_map()}, {"style_code": "[1, 2"}, 400, "not valid JSON"),
    ("wrong style code length", {"labels": labels_map()}, {"style_code": "[1, 2]"}, 400, "1 x 16 finite numbers"),
    ("style and code", {"labels": labels_map(), "style": np.zeros((8, 8, 3), np.uint8)}, {"style_code": "[0]"}, 400, "either"),
    ("bad format", {"labels": labels_map()}, {"format": "gif"}, 400, "format"),
    ("bad size", {"labels": labels_map()}, {"size": "big"}, 400, "size"),
    ("huge size", {"labels": labels_map()}, {"size": "99999x10"}, 400, "out of range"),
    ("negative seed", {"labels": labels_map()}, {"seed": "-1"}, 422, "seed"),
    ("missing labels", {"style": np.zeros((8, 8, 3), np.uint8)}, {}, 422, "labels"),
]


def _encode_case(name: str, value: object) -> bytes:
    if name == "JPEG label map":
        buf = io.BytesIO()
        Image.fromarray(labels_map()).save(buf, format="JPEG")
        return buf.getvalue()
    if name == "two channels":
        buf = io.BytesIO()
        Image.new("LA", (10, 10)).save(buf, format="PNG")
        return buf.getvalue()
    return png(value) if isinstance(value, np.ndarray) else value  # type: ignore[return-value]


@pytest.mark.parametrize("name,files,data,status,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_4xx_that_names_the_problem(server, name, files, data, status, words) -> None:  # type: ignore[no-untyped-def]
    body = {k: _encode_case(name, v) for k, v in files.items()}
    r = post(server["url"] + "/v1/synthesize", body, data=data)
    assert r.status_code == status, r.text
    assert words.lower() in r.json()["error"]["message"].lower()


VAE_MAX_PIXELS = 600 * 600  # the "/" app's limits.max_pixels


@pytest.mark.parametrize("field", ["labels", "style", "encode"])
def test_hostile_images_get_a_4xx_naming_the_field_or_a_correct_image(server, field: str) -> None:  # type: ignore[no-untyped-def]
    """bench/hostile_images.py's corpus on every image field: never a 5xx, never a dead replica."""
    from drills import hostile_drill

    result = hostile_drill(server["url"], max_pixels=VAE_MAX_PIXELS, fields=(field,))
    assert result["wrong"] == [], "\n".join(result["wrong"])
    assert result["healthy_after"] and not any(status.startswith("5") for status in result["statuses"])
    assert post(server["url"] + "/v1/synthesize", {"labels": png(labels_map())}).status_code == 200


def test_fuzzed_api_keeps_its_contract(server) -> None:  # type: ignore[no-untyped-def]
    """schemathesis, all checks, positive and negative cases, every route of the VAE app (CI-sized)."""
    from drills import run_schemathesis

    result = run_schemathesis(server["url"], max_examples=150, timeout=300)
    assert result["returncode"] == 0, result["output"][-6000:]
    assert result["cases"] >= 300, result["output"][-3000:]
    assert requests.get(server["url"] + "/readyz", timeout=60).status_code == 200
    print(result["output"][-1500:])


def test_style_images_are_read_upright_by_their_exif_orientation(server) -> None:  # type: ignore[no-untyped-def]
    from PIL import ImageOps

    rgb = np.random.default_rng(3).integers(0, 256, (40, 64, 3)).astype(np.uint8)
    image = Image.fromarray(rgb)
    exif = image.getexif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95, exif=exif)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))).convert("RGB"))
    assert upright.shape == (64, 40, 3)
    sideways = post(server["url"] + "/v1/encode", {"style": buf.getvalue()}).json()["mu"]
    assert sideways == post(server["url"] + "/v1/encode", {"style": png(upright)}).json()["mu"]


def test_other_bad_requests_and_the_app_keeps_serving(server) -> None:  # type: ignore[no-untyped-def]
    url = server["url"]
    style = png(np.zeros((8, 8, 3), np.uint8))
    no_encoder = post(url + "/plain/v1/synthesize", {"labels": png(labels_map()), "style": style})
    assert no_encoder.status_code == 400 and "no style input" in no_encoder.json()["error"]["message"]
    assert post(url + "/plain/v1/encode", {"style": style}).status_code == 400
    as_json = requests.post(url + "/v1/synthesize", json={"labels": [[1, 2]]}, timeout=30)
    assert as_json.status_code == 415 and "multipart" in as_json.json()["error"]["message"]
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    assert post(url + "/v1/encode", {"style": gif.getvalue()}).status_code == 415
    ok = post(url + "/v1/synthesize", {"labels": png(labels_map())})
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/png"


def test_limits_auth_timeout_and_backpressure(server) -> None:  # type: ignore[no-untyped-def]
    url = server["url"] + "/strict/v1/synthesize"
    auth = {"Authorization": "Bearer s3cret-test-token"}
    small = png(labels_map(8, 8))
    assert post(url, {"labels": small}).status_code == 401
    assert post(url, {"labels": small}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert requests.get(server["url"] + "/strict/healthz", timeout=30).status_code == 200  # probes need no token
    r = post(url, {"labels": small}, headers=auth)
    assert r.status_code == 200, r.text
    big = png((np.random.default_rng(0).random((160, 160)) * 12).astype(np.uint8))  # ~12 kB > 4,000 bytes
    too_big = post(url, {"labels": big}, headers=auth)
    assert too_big.status_code == 413 and "limit" in too_big.json()["error"]["message"]

    def chunks():  # no Content-Length: the body is counted as it streams
        for _ in range(10):
            yield b"x" * 1000

    chunked = requests.post(url, data=chunks(), headers={**auth, "Content-Type": "multipart/form-data; boundary=zz"}, timeout=30)
    assert chunked.status_code == 413
    # one replica, one request at a time and one queued: a burst overflows the queue
    with ThreadPoolExecutor(12) as pool:
        burst = list(pool.map(lambda _: post(url, {"labels": small}, headers=auth), range(12)))
    codes = sorted(r.status_code for r in burst)
    assert 200 in codes and 503 in codes, codes
    full = next(r for r in burst if r.status_code == 503)
    assert full.headers.get("retry-after") == "7" and "capacity" in full.json()["error"]["message"]
    assert post(url, {"labels": small}, headers=auth).status_code == 200  # still serving


def test_a_request_past_the_timeout_gets_408(server) -> None:  # type: ignore[no-untyped-def]
    r = post(server["url"] + "/timeout/v1/synthesize", {"labels": png(labels_map())})
    assert r.status_code == 408 and "longer than" in r.json()["error"]["message"]
    assert requests.get(server["url"] + "/timeout/healthz", timeout=30).status_code == 200


def test_checkpoint_swap_through_user_config_drops_no_request(server) -> None:  # type: ignore[no-untyped-def]
    from ray import serve

    url = server["url"] + "/plain/v1/synthesize"
    body = png(labels_map(seed=20))
    before = post(url, {"labels": body})
    handle = serve.get_deployment_handle("SpadeGenerator", app_name="plain")
    pid = handle.info.remote().result()["pid"]
    statuses, identities, stop = [], set(), threading.Event()

    def load() -> None:
        while not stop.is_set():
            r = post(url, {"labels": body})
            statuses.append(r.status_code)
            identities.add(r.headers.get("x-checkpoint"))

    thread = threading.Thread(target=load)
    thread.start()
    try:
        # `serve deploy` of the same config with only the generator's user_config changed
        new = {"checkpoint": str(server["root"] / "plain2")}
        apps = [application(a["name"], a["route_prefix"], a["args"], [{"name": "SpadeGenerator", "user_config": new}])
                if a["name"] == "plain" else a for a in server["apps"]]
        deploy(apps)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(i and "plain2" in i for i in identities):
            time.sleep(0.2)
    finally:
        stop.set()
        thread.join()
    assert statuses and set(statuses) == {200}, statuses
    after = post(url, {"labels": body})
    assert "plain2" in after.headers["x-checkpoint"]
    want = expected_image(server["models"]["plain2"], labels_map(seed=20))
    assert np.abs(decode(after.content).astype(int) - want.astype(int)).max() <= 1
    assert not np.array_equal(decode(after.content), decode(before.content))
    assert handle.info.remote().result()["pid"] == pid  # reconfigured in place, not replaced


# --- metrics -------------------------------------------------------------------------------


def test_metrics_endpoint_exposes_the_app_series(server, ray_cluster) -> None:  # type: ignore[no-untyped-def]
    post(server["url"] + "/plain/v1/synthesize", {"labels": png(labels_map())})
    port = ray_cluster.nodes()[0]["MetricsExportPort"]
    wanted = [
        "ray_spade_serve_requests_total", "ray_spade_serve_request_latency_seconds_bucket", "ray_spade_serve_batch_size_bucket",
        "ray_spade_serve_queue_wait_seconds_bucket", "ray_spade_serve_inference_seconds_bucket", "ray_spade_serve_replicas",
        "ray_spade_serve_model_loads_total", "ray_serve_num_http_requests_total",
    ]
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        if all(w in text for w in wanted):
            break
        time.sleep(2)
    missing = [w for w in wanted if w not in text]
    assert not missing, missing
    assert 'route="/v1/synthesize"' in text and 'status="200"' in text and 'deployment="SpadeGenerator"' in text
