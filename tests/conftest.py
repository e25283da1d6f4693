"""Shared fixtures: the real images in ../shared/data, one local Ray for the session, source-layout builders."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
COCO = SHARED / "data" / "coco"
EDGE_CASES = SHARED / "data" / "edge_cases"

# Ray stays on loopback and sends nothing: set before any test imports ray.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("http_proxy", "http://127.0.0.1:9")
os.environ.setdefault("HTTP_PROXY", "http://127.0.0.1:9")
os.environ.setdefault("NLTK_DATA", str(SHARED / "nltk_data"))


@pytest.fixture(scope="session", autouse=True)
def _remove_ray_temp_dirs_of_killed_runs():
    """The fault tests SIGKILL drivers, which then cannot remove their Ray temp dir: remove what the session left,
    unless a live process still names it (a Ray started by another test session on this machine)."""
    before = set(Path("/tmp").glob("ray-*"))
    yield
    live = " ".join(_command_lines())
    for path in set(Path("/tmp").glob("ray-*")) - before:
        if str(path) not in live:
            shutil.rmtree(path, ignore_errors=True)


def _command_lines() -> list[str]:
    out = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            out.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:  # gone meanwhile
            pass
    return out


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for the whole session (stage runs reuse it instead of starting their own)."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="ray-t-", dir="/tmp")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        _temp_dir=temp_dir,
        configure_logging=False,
        log_to_driver=False,
    )
    yield ray
    import gc

    gc.collect()  # free cyclic actor handles / object refs while Ray is alive (see curation.runner._shutdown)
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def coco_files() -> list[Path]:
    files = sorted(COCO.glob("*.jpg"))
    assert len(files) >= 50, f"expected the shared COCO photos in {COCO}"
    return files


@pytest.fixture(scope="session")
def edge_case_files() -> list[Path]:
    return sorted(p for p in EDGE_CASES.rglob("*") if p.is_file() and p.name != "manifest.json")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random LLaVA, T5, VAE, DC-AE and CLIP of the real classes, saved and loaded like Hub checkpoints, and
    tiny LAION aesthetic and NSFW heads (safetensors files)."""
    from curation.tiny import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture()
def s3_server(monkeypatch) -> dict[str, str]:
    """A real S3-compatible server (moto's server mode) on 127.0.0.1, random port; stopped after the test.

    Returns the environment a client needs (dummy credentials, the endpoint); it is also set in this process, so
    fsspec URLs (`s3://...`) resolve to the server here and in the subprocesses the test starts.
    """
    import logging

    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",  # honoured by botocore, hence by s3fs and boto3
        "no_proxy": "127.0.0.1,localhost",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()  # instances built before the endpoint was set would miss it
    try:
        yield env
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()
