"""Shared fixtures: real S3 endpoints on loopback (moto, and Ceph RGW when CI provides one).

S3 code is configured only through the standard AWS variables, so the fixtures point those at
the test server; the code under test cannot tell a test endpoint from production.
"""

from __future__ import annotations

import os
import shlex
import socket
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest

CEPH_ENV_VAR = "DEPTH_ENGINE_TEST_RGW_ENV"
# Variables that would point boto3 elsewhere than the fixture's endpoint if inherited.
_FOREIGN_AWS_VARS = (
    "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN",
    "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Backend:
    """A running S3 endpoint; the AWS_* environment points at it while the test runs."""

    name: str
    endpoint: str

    def client(self):
        """A client from a fresh session: boto3's default session caches the first credentials."""
        import boto3

        return boto3.session.Session().client("s3", endpoint_url=self.endpoint)

    def bucket(self, prefix: str = "t") -> str:
        """A fresh, uniquely named, empty bucket."""
        name = f"{prefix}-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a free loopback port, with the AWS environment pointing at it."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    settings = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in (*settings, *_FOREIGN_AWS_VARS)}
    for k in _FOREIGN_AWS_VARS:
        os.environ.pop(k, None)
    os.environ.update(settings)
    import boto3

    boto3.DEFAULT_SESSION = None  # forget credentials resolved before the environment changed
    try:
        yield S3Backend("moto", endpoint)
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _read_env_file(path: str) -> dict[str, str]:
    """`export K=V` lines as written by tools/ceph-rgw/up.sh."""
    result = {}
    with open(path) as f:
        for line in f:
            words = shlex.split(line, comments=True)
            if words[:1] == ["export"]:
                words = words[1:]
            for word in words:
                key, sep, value = word.partition("=")
                if sep:
                    result[key] = value
    return result


def _ceph_backend(monkeypatch: pytest.MonkeyPatch) -> S3Backend:
    path = os.environ.get(CEPH_ENV_VAR)
    if not path:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {CEPH_ENV_VAR} is unset: start tools/ceph-rgw/up.sh and export it")
        pytest.skip(f"Ceph RGW not configured ({CEPH_ENV_VAR} unset)")
    if not os.path.isfile(path):
        pytest.fail(f"{CEPH_ENV_VAR}={path} does not exist (did up.sh run?)")
    settings = _read_env_file(path)
    endpoint = settings.get("AWS_ENDPOINT_URL")
    if not endpoint:
        pytest.fail(f"{path} sets no AWS_ENDPOINT_URL")
    for k in _FOREIGN_AWS_VARS:
        monkeypatch.delenv(k, raising=False)
    for k, v in settings.items():
        monkeypatch.setenv(k, v)
    if "AWS_DEFAULT_REGION" in settings:
        monkeypatch.setenv("AWS_REGION", settings["AWS_DEFAULT_REGION"])
    parts = urlsplit(endpoint)
    try:
        socket.create_connection((parts.hostname, parts.port or 80), timeout=3).close()
    except OSError as e:
        pytest.fail(f"Ceph RGW at {endpoint} is not reachable ({e}); is up.sh still running?")
    return S3Backend("ceph", endpoint)


def _backend(name: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> S3Backend:
    import boto3

    # boto3.client() uses a default session that keeps the first credentials it resolved;
    # drop it so tests that call boto3.client() directly follow the backend's environment.
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    if name == "moto":
        return request.getfixturevalue("s3_server")
    return _ceph_backend(monkeypatch)


S3_BACKENDS = ["moto", pytest.param("ceph", marks=pytest.mark.ceph)]


@pytest.fixture(params=S3_BACKENDS)
def s3_backend(request, monkeypatch) -> S3Backend:
    """Each S3 test runs on moto and on Ceph RGW (skipped locally without Ceph, required in CI)."""
    return _backend(request.param, request, monkeypatch)


@pytest.fixture
def s3_bucket(s3_backend) -> str:
    return s3_backend.bucket()


# A whole job on Ray (a minute of CPU) runs on one S3 server: Ceph RGW where it is set up (and
# always in CI, which must set it up), else moto. The storage layer's own tests run on both.
ONE_S3 = ["ceph" if os.environ.get(CEPH_ENV_VAR) or os.environ.get("CI") == "true" else "moto"]


@pytest.fixture(params=ONE_S3)
def job_s3_bucket(request, monkeypatch) -> str:
    """A fresh bucket on the one S3 server of the costly tests (ONE_S3)."""
    return _backend(request.param, request, monkeypatch).bucket()


@pytest.fixture
def local_root(tmp_path) -> str:
    """A store directory that does not exist yet (stores create it on first write)."""
    return str(tmp_path / "store")


@pytest.fixture(params=["local", *S3_BACKENDS])
def store_url(request, tmp_path, monkeypatch) -> str:
    """An empty store root on every backend: a local directory, or a prefix in a fresh bucket."""
    if request.param == "local":
        return str(tmp_path / "store")
    backend = _backend(request.param, request, monkeypatch)
    return f"s3://{backend.bucket()}/root/"


@dataclass(frozen=True)
class TinyModels:
    teacher: str          # random DepthAnythingForDepthEstimation, 518 like the real ones
    other_teacher: str    # same architecture, other weights
    sky: str              # random SegFormer with a 'sky' class
    no_sky: str           # random SegFormer without one


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModels:
    """Tiny real transformers models, randomly initialised and saved with save_pretrained."""
    from labelers.random_models import save_random_segmenter, save_random_teacher

    root = tmp_path_factory.mktemp("models")
    return TinyModels(
        teacher=str(save_random_teacher(root / "teacher", size="tiny", seed=0)),
        other_teacher=str(save_random_teacher(root / "teacher-b", size="tiny", seed=1)),
        sky=str(save_random_segmenter(root / "sky", size="tiny")),
        no_sky=str(save_random_segmenter(root / "no-sky", size="tiny", sky=False)),
    )


# The files that take a minute or more, slowest first, run before the rest: pytest-xdist hands
# whole files (--dist loadfile) to whichever process is free, in collection order, so a slow
# file left for the end would run there alone while the other process idles.
SLOW_FIRST = ("test_label_size.py", "test_compare.py", "test_cluster.py", "test_bench.py", "test_convert_evaluate_cli.py",
              "test_label_cli.py", "test_teacher_output.py", "test_verify.py", "test_repair.py",
              "test_preemption.py", "test_train_ray.py", "test_teacher_families_ray.py", "test_chaos.py",
              "test_train_student.py", "test_student_loader.py", "test_keep_depth.py", "test_dry_run.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))   # stable: a file's own order kept
