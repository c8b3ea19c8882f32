"""The app's Prometheus series, recorded with ``ray.util.metrics`` inside the replicas.

Ray's metrics agent exports them on every node's metrics export port (``spade-serve``
starts Ray with ``--metrics-export-port`` 8080) beside Ray Serve's own ``ray_serve_*``
series, with Ray's ``ray_`` prefix; counters get ``_total``:

* ``ray_spade_serve_requests_total{route, status}`` (499: the client hung up first; 500: a bug)
* ``ray_spade_serve_request_latency_seconds{route}`` (histogram, ingress: whole request)
* ``ray_spade_serve_batch_size{deployment, model}`` (histogram of merged batch sizes)
* ``ray_spade_serve_computed_requests_total{deployment, model}`` (requests a forward pass computed: images
  drawn, styles encoded; a counter, because Ray 2.60 reports a histogram's ``_sum`` from its
  buckets' midpoints: five batches of 1 read 2.5)
* ``ray_spade_serve_queue_wait_seconds{deployment, model}`` (histogram: arrival at a replica -> its batch starts)
* ``ray_spade_serve_inference_seconds{deployment, model}`` (histogram: one batch's forward pass)
* ``ray_spade_serve_replicas{deployment}`` (gauge, 1 per live replica: ``sum by (deployment)``)
* ``ray_spade_serve_model_loads_total{deployment, model}`` (checkpoint loads, the first and every swap)
* ``ray_spade_serve_model_load_failures_total{deployment, model}`` (new checkpoints that failed to load)
* ``ray_spade_serve_replica_failures_total{retried}`` (model calls whose replica died: sent again, or 503)
* ``ray_spade_serve_cancelled_requests_total{deployment, model, stage}`` (calls whose client hung up, reaching
  the replica: ``queued``, left out of the batches, or ``running``, its batch already computing)

``model`` is the served model's name (``default`` for a single-checkpoint app). A client that hangs up is counted by the ingress as ``requests_total{status="499"}`` (nginx's
code for it; the client never sees it).

A ``prometheus_client`` metric inside a replica would need an HTTP port per replica
process; Ray's agent aggregates per node instead.
"""

from __future__ import annotations

from functools import cache
from typing import Any

LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
BATCH_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]


@cache
def series() -> dict[str, Any]:
    """The metric objects, created once per process (inside a replica: Ray must be up)."""
    from ray.util.metrics import Counter, Gauge, Histogram

    return {
        "requests": Counter("spade_serve_requests", description="HTTP requests by route and status", tag_keys=("route", "status")),
        "latency": Histogram(
            "spade_serve_request_latency_seconds", description="Request latency in the ingress",
            boundaries=LATENCY_BUCKETS, tag_keys=("route",),
        ),
        "batch_size": Histogram(
            "spade_serve_batch_size", description="Requests merged into one forward pass",
            boundaries=BATCH_BUCKETS, tag_keys=("deployment", "model"),
        ),
        "computed": Counter(
            "spade_serve_computed_requests", description="Requests computed by forward passes (images drawn, styles encoded)",
            tag_keys=("deployment", "model"),
        ),
        "queue_wait": Histogram(
            "spade_serve_queue_wait_seconds", description="Wait from arrival at a replica to the start of its batch",
            boundaries=LATENCY_BUCKETS, tag_keys=("deployment", "model"),
        ),
        "inference": Histogram(
            "spade_serve_inference_seconds", description="Forward pass time of one batch",
            boundaries=LATENCY_BUCKETS, tag_keys=("deployment", "model"),
        ),
        "replicas": Gauge("spade_serve_replicas", description="Live replicas (1 per replica; sum them)", tag_keys=("deployment",)),
        "loads": Counter("spade_serve_model_loads", description="Checkpoint loads (start-up and swaps)", tag_keys=("deployment", "model")),
        "load_failures": Counter(
            "spade_serve_model_load_failures", description="Checkpoints that failed to load (the old model kept serving)",
            tag_keys=("deployment", "model"),
        ),
        "cancelled": Counter(
            "spade_serve_cancelled_requests", description="Model calls cancelled because the client hung up, by stage",
            tag_keys=("deployment", "model", "stage"),
        ),
        "replica_failures": Counter(
            "spade_serve_replica_failures", description="Model calls whose replica died under them (retried: sent again)",
            tag_keys=("retried",),
        ),
    }
