"""`apexrank retrain` as the Kubernetes CronJob runs it, against the embedded Kafka and Redis.

The job gets exactly its container's environment (the CPU image's ENV, the ConfigMap and Secret
its envFrom names, its env) and its arguments; each volume it mounts is a local directory (one per
claim, shared with every other pod that mounts the claim), and every path the settings name must
lie on one. Only the Kafka bootstrap servers, the Redis URL and the Pushgateway are the test's (the
embedded stack's, and a loopback receiver standing in for the gateway). The volumes hold what a
running deployment leaves there, each written where the manifest of its writer says: the MERT
config.json in HF_HOME and two workers' index shards (each its half of the songs' embedding store +
FAISS snapshot; scored songs in Redis) by the workers, the engagement log by the feedback consumer.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from consumers.retrain import current_model
from consumers.stack import EmbeddedStack
from indexes.base import EmbeddingRecord
from ranker import stores
from ranker.encoders import encoder_spec
from ranker.model.artifact import ScoringModel
from ranker.model.registry import promote, resolve_model_dir
from ranker.model.targets import TargetTransform
from ranker.scoring import SongMeta, score_predictions
from ranker.serving.writer import write_scored
from ranker.settings import Settings
from ranker.synth import simulate_catalog
from tests.helpers import read_topic
from tests.test_deploy import _container, k8s_container_env, k8s_index, make_settings, on_volumes, pod_volumes
from tests.test_encoders import MERT_EXTRA
from tests.test_retrain import engage, label_set, push_receiver
from tests.test_worker import song

BIN = Path(sys.executable).parent
#: MERT-v1-95M's architecture as its config.json on the Hub gives it (a HuBERT-base shape): what the
#: worker's first start leaves in HF_HOME. Retrain reads this file only, never the weights.
MERT_95M_CONFIG = {
    **MERT_EXTRA,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "conv_dim": [512] * 7,
    "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
    "conv_stride": [5, 2, 2, 2, 2, 2, 2],
    "conv_bias": False,
    "feat_extract_norm": "group",
    "do_stable_layer_norm": False,
}
N_SONGS = 160
N_WORKERS = 2


def pod_settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    return make_settings({k: v for k, v in env.items() if k.startswith("APEXRANK_")}, monkeypatch)


def on_stack(env: dict[str, str], stack: EmbeddedStack, pushgateway: str = "") -> dict[str, str]:
    """The values a cluster gives that this machine cannot: its brokers, its Redis and its Pushgateway."""
    assert "APEXRANK_KAFKA__BOOTSTRAP_SERVERS" in env and "APEXRANK_REDIS__URL" in env
    assert "APEXRANK_RETRAIN__PUSHGATEWAY_URL" in env
    return {
        **env,
        "APEXRANK_KAFKA__BOOTSTRAP_SERVERS": stack.settings.kafka.bootstrap_servers,
        "APEXRANK_REDIS__URL": stack.settings.redis.url.get_secret_value(),
        "APEXRANK_RETRAIN__PUSHGATEWAY_URL": pushgateway,
    }


def pod_env(kind: str, name: str, root: Path, stack: EmbeddedStack, pod_index: int = 0) -> dict[str, str]:
    doc = k8s_index()[(kind, name)]
    container = _container(kind, name)
    return on_stack(on_volumes(k8s_container_env(container, pod_index), pod_volumes(doc, container, root)), stack)


def worker_settings(root: Path, stack: EmbeddedStack, pod_index: int, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Worker ``pod_index``'s settings, on the CPU (no GPU here)."""
    worker = pod_settings(pod_env("StatefulSet", "apexrank-worker", root, stack, pod_index), monkeypatch)
    return worker.model_copy(update={"model": worker.model.model_copy(update={"device": "cpu"})})


def write_hub_config(env: dict[str, str], repo_id: str) -> None:
    """The Hub cache layout under HF_HOME (refs/main -> a snapshot holding config.json)."""
    repo = Path(env["HF_HOME"]) / "hub" / f"models--{repo_id.replace('/', '--')}"
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots" / revision).mkdir(parents=True, exist_ok=True)
    (repo / "snapshots" / revision / "config.json").write_text(json.dumps(MERT_95M_CONFIG))


def create_topic(settings: Settings, name: str) -> None:
    """What deploy/topics.sh does before any job runs (the ConfigMap turns auto-creation off)."""
    admin = KafkaAdminClient(**settings.kafka.client_kwargs())
    try:
        admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1)])
    except TopicAlreadyExistsError:
        pass
    finally:
        admin.close()


def trained_head(settings: Settings) -> str:
    """A head at models/current before the workers start ("A trained head first", deploy/README.md): the
    seeded one with a fitted target transform stands in for `apexrank train ... --promote`'s."""
    spec = encoder_spec(settings)
    seeded = ScoringModel.from_seed(spec.dim, settings.model.seed, spec.encoder_id, n_layers=spec.n_layers)
    plays = np.random.default_rng(1).integers(30, 90, size=200)
    transform = TargetTransform.fit({"streams": plays, "likes": plays // 10}).to_dict()
    head = seeded.with_target_transform(transform, training={"note": "stands in for a trained head"})
    models = settings.head_dir.parent
    return promote(models, head.save_versioned(models))


def worker_output(workers: list[Settings], catalog: Path) -> list[list[str]]:
    """The workers' writes, the catalog's songs dealt out among them in turn (as partitions would):
    embeddings (each worker's own store, then FAISS), then scores in Redis. Returns each one's songs.

    The stand-in encoder puts each song's hidden like probability along one direction of its
    features, so that a like read-out can learn it and the job has something to promote.
    """
    settings = workers[0]
    spec = encoder_spec(settings)
    model = current_model(settings)
    rows = pq.read_table(catalog, columns=["song_id", "generator", "latent_like_prob"]).to_pylist()
    rng = np.random.default_rng(7)
    p = np.array([r["latent_like_prob"] for r in rows])
    taste = np.log(p / (1 - p))
    direction = rng.normal(size=spec.dim)
    layers = rng.normal(size=(len(rows), spec.n_layers, spec.dim)) + 3 * (
        ((taste - taste.mean()) / taste.std())[:, None, None] * direction / np.linalg.norm(direction)
    )
    layers = layers.astype(np.float32)
    records = []
    for row, lay in zip(rows, layers, strict=True):
        vector = lay.mean(axis=0)
        records.append(EmbeddingRecord(row["song_id"], spec.encoder_id, lay, vector / np.linalg.norm(vector), 1, 150))
    for n, worker in enumerate(workers):
        with stores.embedding_index(worker, spec.vector_dim) as index:
            index.add(records[n :: len(workers)])
    now = datetime.now(UTC)  # new songs: inside the cold-start window a promotion rescores
    metas = [
        SongMeta(r["song_id"], r["generator"], (now - timedelta(minutes=i)).isoformat()) for i, r in enumerate(rows)
    ]
    store = stores.score_store(settings)
    try:
        scored = score_predictions(settings, model, model.predict(layers), metas)
        write_scored(store, settings, [s.record(now.isoformat()) for s in scored])
    finally:
        store.close()
    return [[r.song_id for r in records[n :: len(workers)]] for n in range(len(workers))]


@dataclass
class Deployment:
    root: Path
    workers: list[Settings]
    shard_songs: list[list[str]]  # each worker's songs, in its own shard
    current: str  # the promoted head's version


@pytest.fixture
def deployment(stack: EmbeddedStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Deployment:
    """The volumes (under tmp_path/claims) and Redis as two workers and the feedback consumer leave them."""
    catalog = simulate_catalog(tmp_path / "world", n_songs=N_SONGS, seed=11, duration_s=0.5).catalog_path
    worker_env = pod_env("StatefulSet", "apexrank-worker", tmp_path, stack, pod_index=0)
    write_hub_config(worker_env, worker_env["APEXRANK_MODEL__MERT_MODEL"])
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(Path(worker_env["HF_HOME"]) / "hub"))  # read at import
    workers = [worker_settings(tmp_path, stack, n, monkeypatch) for n in range(N_WORKERS)]
    assert len({w.index_dir for w in workers}) == N_WORKERS
    current = trained_head(workers[0])
    shard_songs = worker_output(workers, catalog)
    assert sorted(len(s) for s in shard_songs) == [N_SONGS // N_WORKERS] * N_WORKERS
    engage(pod_settings(pod_env("Deployment", "apexrank-feedback", tmp_path, stack), monkeypatch), catalog)
    create_topic(workers[0], workers[0].kafka.topics.models_promoted)
    # The job's Redis namespace is the default key prefix: this session's Redis is its own, and no other
    # test writes under that prefix. Both tests write the same songs, so either order works.
    return Deployment(tmp_path, workers, shard_songs, current)


def run_job(
    container: dict[str, Any], doc: dict[str, Any], root: Path, stack: EmbeddedStack, pushgateway: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, str]]:
    mounts = pod_volumes(doc, container, root)
    env = on_stack(on_volumes(k8s_container_env(container), mounts), stack, pushgateway)
    # What the container runtime adds: the image user's home and /tmp, both emptyDirs in the pod.
    process_env = {**env, "PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(mounts["/home/apexrank"])}
    process_env["TMPDIR"] = str(mounts["/tmp"])
    # This world has engagement but no served log, so the off-policy gate (on in the manifests, as by
    # default) could never pass; it has its own tests (tests/test_retrain_gate.py). Here: the Spearman gate.
    process_env["APEXRANK_RETRAIN__OFF_POLICY_GATE"] = "false"
    # No worker runs beside this job, so no song is scored by the old head after the promotion:
    # the second rescore pass's wait (about 25 s) would only idle. It has its own tests (test_retrain.py).
    process_env["APEXRANK_RETRAIN__RESCORE_GRACE_S"] = "0"
    proc = subprocess.run(
        [str(BIN / "apexrank"), *container["args"]],
        env=process_env,
        cwd=mounts["/home/apexrank"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    return proc, env


def test_the_cronjob_retrains_with_exactly_its_manifests_environment(
    deployment: Deployment, stack: EmbeddedStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It reads every worker's shard, the engagement log and the promoted head, promotes a better one,
    rescores the songs of every shard, and pushes its figures to the Pushgateway."""
    root, workers = deployment.root, deployment.workers
    doc = k8s_index()[("CronJob", "apexrank-retrain")]
    with push_receiver() as gateway:
        proc, env = run_job(_container("CronJob", "apexrank-retrain"), doc, root, stack, gateway.url)

    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    job = pod_settings(env, monkeypatch)
    assert job.index_shards == [w.index_dir for w in workers], "the job finds every shard the workers write"
    # Every song (all past the exposure threshold) was met in the shard that holds it, with its engagement
    # and its Redis metadata: one shard alone holds half of them.
    assert report["n_train"] + report["n_holdout"] == N_SONGS, report
    assert report["current_version"] == deployment.current, "the job reads the head the deployment promoted"
    assert report["promoted"], report  # the read-out learns the likes the features carry
    model_dir = Path(report["model_dir"])
    assert model_dir.is_relative_to(root / "claims" / "apexrank-state"), "the model lands on the state volume"
    assert resolve_model_dir(job.head_dir) == model_dir
    announced = read_topic(job, job.kafka.topics.models_promoted, 1)
    assert report["candidate_version"].encode() in [m.key for m in announced]
    for songs in deployment.shard_songs:  # the cold-start window is rescored from every shard
        versions = {(song(job, s) or {}).get("model_version") for s in songs}
        assert versions == {report["candidate_version"]}, versions
    (push,) = gateway.pushes
    pushed = push.samples()
    assert pushed[("apexrank_retrain_promoted", ())] == 1.0
    assert pushed[("apexrank_retrain_songs", label_set(set="train"))] == report["n_train"]


def test_without_the_index_volume_the_job_finds_no_embedding_store(
    deployment: Deployment, stack: EmbeddedStack
) -> None:
    """The manifest as it was before issue 15: no index volume, no index path or shards. The failed run
    still pushes its time."""
    doc = copy.deepcopy(k8s_index()[("CronJob", "apexrank-retrain")])
    spec = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    container = spec["containers"][0]
    index_mount = "/var/lib/apexrank-index"
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["mountPath"] != index_mount]
    container["env"] = [e for e in container["env"] if index_mount not in e.get("value", "")]

    with push_receiver() as gateway:
        proc, _ = run_job(container, doc, deployment.root, stack, gateway.url)

    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no embedding store" in proc.stderr
    (push,) = gateway.pushes
    assert [name for name, _ in push.samples()] == ["apexrank_retrain_last_run_timestamp_seconds"]
