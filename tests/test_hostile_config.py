"""Mistaken or hostile configuration is refused on the driver, before any cluster time: one
line on stderr, exit 2, no traceback, OUTPUT not created. Models for another task, remote
code, weights a worker would not load, model keys that climb out of the cache, URLs without a
bucket, unusable or missing input shards, and credentials in an endpoint URL; and an OUTPUT
inside the INPUT tree, which must label and then resume."""
from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import boto3
import pytest
from builders import photo_samples, write_shard
from helpers_cli import offline_cache, run  # noqa: F401 - autouse: offline, a private model cache

from engine.inputs import InputError, expand
from engine.models import (
    DEPTH,
    SEGMENTATION,
    ModelRef,
    ModelSourceError,
    check_task,
    resolve,
    safe_relative_path,
)
from storage.layout import check_shard_name
from storage.objectstore import InvalidURL, StorageError, redact
from storage.stores import open_store


def refused(*argv, output: Path | None = None, env: dict | None = None) -> str:
    """Run the CLI; it must exit 2 with one line and no traceback, leaving OUTPUT absent."""
    p = run(*argv, env=env, check=2)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    if output is not None:
        assert not output.exists()
    return lines[0]


@pytest.fixture
def raw(tmp_path) -> Path:
    d = tmp_path / "raw"
    d.mkdir()
    write_shard(d / "shard-000000.tar", photo_samples([(48, 64)], "a"))
    return d


def model_copy(src: str, dest: Path, config: dict | None = None, drop: tuple = ()) -> str:
    """A copy of a saved model with config.json entries changed (None removes one)."""
    shutil.copytree(src, dest)
    doc = json.loads((dest / "config.json").read_text())
    for k, v in (config or {}).items():
        if v is None:
            doc.pop(k, None)
        else:
            doc[k] = v
    (dest / "config.json").write_text(json.dumps(doc))
    for name in drop:
        (dest / name).unlink()
    return str(dest)


def ref_of(path: str) -> ModelRef:
    """A ModelRef for the config checks alone (no weights needed)."""
    return ModelRef(path, path, "local", None, "", {}, None, None)


# 1. A model for the wrong task, or one that asks for remote code ------------------------------

def test_teacher_must_be_depth_and_sky_segmentation(tmp_path, raw, tiny_models):
    out = tmp_path / "out"
    line = refused("label", f"{raw}/", str(out), "--teacher", tiny_models.sky, "--sky", "none", output=out)
    assert tiny_models.sky in line and "SegformerForSemanticSegmentation" in line
    assert "not a depth-estimation model" in line
    line = refused("label", f"{raw}/", str(out), "--teacher", tiny_models.teacher, "--sky", tiny_models.teacher,
                   output=out)
    assert "DepthAnythingForDepthEstimation" in line and "not a semantic-segmentation model" in line
    line = refused("evaluate", f"{raw}/", "--teacher", tiny_models.sky)
    assert "not a depth-estimation model" in line


def test_task_follows_the_architecture_not_only_the_model_type(tmp_path, tiny_models):
    """model_type 'dpt' is in both auto mappings: a DPTForSemanticSegmentation is no teacher."""
    seg = model_copy(tiny_models.teacher, tmp_path / "dpt-seg",
                     {"model_type": "dpt", "architectures": ["DPTForSemanticSegmentation"]})
    with pytest.raises(ModelSourceError, match="DPTForSemanticSegmentation.*not a depth-estimation"):
        check_task(ref_of(seg), DEPTH)
    check_task(ref_of(seg), SEGMENTATION)
    check_task(ref_of(tiny_models.teacher), DEPTH)
    check_task(ref_of(tiny_models.sky), SEGMENTATION)


@pytest.mark.parametrize("change, file", [
    ({"auto_map": {"AutoModelForDepthEstimation": "modeling_evil.EvilDepth"}}, "config.json"),
    ({"model_type": "evil_depth", "architectures": ["EvilDepth"]}, "config.json"),
    (None, "preprocessor_config.json"),
])
def test_remote_code_is_refused(tmp_path, raw, tiny_models, change, file):
    teacher = model_copy(tiny_models.teacher, tmp_path / "evil", change)
    if change is None:
        pre = Path(teacher) / file
        pre.write_text(json.dumps({**json.loads(pre.read_text()),
                                   "auto_map": {"AutoImageProcessor": "processing_evil.Evil"}}))
    out = tmp_path / "out"
    line = refused("label", f"{raw}/", str(out), "--teacher", teacher, "--sky", "none", output=out)
    assert "depth-engine runs no code from model repositories" in line and "evil" in line


# 1b. Weights: exactly the files from_pretrained(use_safetensors=True) loads -------------------

def test_stray_safetensors_beside_a_pickle_is_refused(tmp_path, raw, tiny_models):
    teacher = model_copy(tiny_models.teacher, tmp_path / "stray")
    os.replace(Path(teacher) / "model.safetensors", Path(teacher) / "other.safetensors")
    (Path(teacher) / "pytorch_model.bin").write_bytes(b"a pickle the engine never loads")
    out = tmp_path / "out"
    line = refused("label", f"{raw}/", str(out), "--teacher", teacher, "--sky", "none", output=out)
    assert "no model.safetensors" in line and "stray" in line


def test_index_naming_a_missing_shard_is_refused(tmp_path, raw, tiny_models):
    teacher = Path(model_copy(tiny_models.teacher, tmp_path / "sharded"))
    os.replace(teacher / "model.safetensors", teacher / "model-00001-of-00002.safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (teacher / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    out = tmp_path / "out"
    line = refused("label", f"{raw}/", str(out), "--teacher", str(teacher), "--sky", "none", output=out)
    assert "model-00002-of-00002.safetensors" in line and "missing" in line


def test_the_hashed_weights_are_the_loaded_weights(tmp_path, tiny_models):
    """A stray file beside model.safetensors is not hashed; a sharded save hashes its shards,
    and the worker's loader loads that same folder."""
    import torch
    from transformers import AutoModelForDepthEstimation

    from labelers.loading import load_pretrained

    single = model_copy(tiny_models.teacher, tmp_path / "single")
    (Path(single) / "other.safetensors").write_bytes(b"not loaded")
    assert list(resolve(single).files) == ["model.safetensors"]
    assert resolve(single).sha256 == resolve(tiny_models.teacher).sha256

    sharded = tmp_path / "sharded"
    AutoModelForDepthEstimation.from_pretrained(tiny_models.teacher).save_pretrained(sharded, max_shard_size="100KB")
    shutil.copy(Path(tiny_models.teacher) / "preprocessor_config.json", sharded)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    (sharded / "stray.safetensors").write_bytes(b"not loaded")
    assert len(shards) > 1 and sorted(resolve(str(sharded)).files) == shards
    model, _ = load_pretrained(AutoModelForDepthEstimation, str(sharded), revision=None, device=torch.device("cpu"))
    assert model.config.model_type == "depth_anything"


# 2. An s3:// model prefix writes only inside the cache ---------------------------------------

def test_pure_relative_path_rule():
    assert safe_relative_path("model.safetensors") and safe_relative_path("sub/dir/x.json")
    for bad in ("", "/abs", "a//b", "./a", "a/.", "a/../b", "..", "a\\b", "a\x00b", "a\nb", "a\x7fb", "dir/"):
        assert not safe_relative_path(bad), bad


def test_second_guard_resolves_the_destination(tmp_path):
    from engine.models import _inside

    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside)
    assert _inside(root, "sub/x.json") == (root / "sub" / "x.json").resolve()
    assert _inside(root, "link/x.json") is None and _inside(root, "../x.json") is None


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_s3_model_keys_that_climb_out_are_refused_before_writing(tmp_path, raw, tiny_models, s3_bucket):
    s3 = boto3.client("s3")
    for f in Path(tiny_models.teacher).iterdir():
        s3.upload_file(str(f), s3_bucket, f"m/{f.name}")
    # The cache is tmp_path/cache (helpers_cli); the download dir is cache/models/<hash>/<version>.
    evil = "m/../../../../escaped/evil.json"
    s3.put_object(Bucket=s3_bucket, Key=evil, Body=b"{}")
    assert evil in [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    before = _tree(tmp_path)
    out = tmp_path / "out"
    line = refused("label", f"{raw}/", str(out), "--teacher", f"s3://{s3_bucket}/m/", "--sky", "none",
                   output=out)
    assert "evil.json" in line and "not a plain relative path" in line
    assert _tree(tmp_path) == before                  # no cache dir, nothing escaped
    assert not (tmp_path / "escaped").exists()


@pytest.mark.parametrize("key", ["m/a//b.json", "m/./c.json", "m/d\\e.json"])
def test_s3_model_keys_with_odd_segments_are_refused(tmp_path, s3_bucket, key):
    s3 = boto3.client("s3")
    s3.put_object(Bucket=s3_bucket, Key="m/config.json", Body=b"{}")
    s3.put_object(Bucket=s3_bucket, Key=key, Body=b"{}")
    with pytest.raises(ModelSourceError, match="not a plain relative path"):
        resolve(f"s3://{s3_bucket}/m/")
    assert not (tmp_path / "cache").exists()


# 3. Configuration that was a traceback ----------------------------------------------------------

@pytest.mark.parametrize("where", ["input", "output", "input-object", "input-bucket-only"])
def test_s3_urls_without_a_bucket_or_key(tmp_path, raw, tiny_models, where):
    out = tmp_path / "out"
    argv, needle = {"input": (["s3://", str(out)], "no bucket"), "output": ([f"{raw}/", "s3://"], "no bucket"),
                    "input-object": (["s3:///x.tar", str(out)], "no bucket"),
                    "input-bucket-only": (["s3://bucket", str(out)], "names no object")}[where]
    line = refused("label", *argv, "--teacher", tiny_models.teacher, "--sky", "none", output=out)
    assert needle in line


def test_url_errors_are_storage_errors_and_value_errors():
    for bad in ("s3://", "s3:///k", "gs://b/k", ""):
        with pytest.raises(InvalidURL) as caught:
            open_store(bad)
        assert isinstance(caught.value, StorageError) and isinstance(caught.value, ValueError)


def test_unusable_shard_names_are_refused_up_front(tmp_path, raw):
    out = tmp_path / "out"
    (raw / ".tar").write_bytes(b"x")
    line = refused("label", f"{raw}/", str(out), output=out)
    assert "'.tar'" in line or "/.tar" in line
    (raw / ".tar").unlink()
    dots = tmp_path / "...tar"
    shutil.copy(raw / "shard-000000.tar", dots)
    line = refused("label", str(dots), str(out), output=out)
    assert "...tar" in line and "'..'" in line


def test_shard_name_rule():
    assert check_shard_name("shard-000001") == "shard-000001"
    for bad in ("", ".", "..", "a/b", "a\\b", "a\x01b", "a\x85b", "\udcff"):
        with pytest.raises(ValueError):
            check_shard_name(bad)


@pytest.mark.parametrize("form", ["single", "brace", "list"])
def test_missing_local_inputs_are_refused_before_output_exists(tmp_path, raw, form):
    out = tmp_path / "out"
    listing = tmp_path / "list.txt"
    listing.write_text(f"{raw}/shard-000000.tar\n{raw}/shard-000007.tar\n")
    spec = {"single": str(raw / "shard-000007.tar"), "brace": f"{raw}/shard-{{000000..000001}}.tar",
            "list": f"@{listing}"}[form]
    line = refused("label", spec, str(out), output=out)
    assert "does not exist" in line and ("shard-000007" in line or "shard-000001" in line)


def test_other_url_schemes_are_refused_as_inputs(tmp_path):
    with pytest.raises(InputError, match="unsupported URL"):
        expand("http://host/x.tar")


# OUTPUT inside the INPUT tree: left out by place, the same on every run ------------------------

def _output_shards(data: Path) -> Path:
    """data/labels/ as a label run leaves it: shards/*.tar, manifest parts, job.json."""
    out = data / "labels"
    (out / "shards").mkdir(parents=True)
    (out / "manifest").mkdir()
    for name in ("shard-000000", "shard-000001"):
        (out / "shards" / f"{name}.tar").write_bytes(b"x")
        (out / "manifest" / f"{name}.parquet").write_bytes(b"x")
    return out


def test_expand_leaves_out_what_lies_under_output_local(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        (data / f"shard-{i:06d}.tar").write_bytes(b"x")
    out = _output_shards(data)
    inputs = [str(data / f"shard-{i:06d}.tar") for i in range(2)]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join([*inputs, str(out / "shards" / "shard-000000.tar")]))
    expected = {f"{data}/": inputs, str(data): inputs, f"{data}/**/*.tar": inputs, f"@{listing}": inputs,
                f"{data}/{{shard-000000.tar,labels/shards/shard-000001.tar}}": inputs[:1]}
    for spec, want in expected.items():
        assert expand(spec, exclude=str(out)) == want, spec
    assert expand(f"{data}/", exclude=f"{out}/") == inputs
    with pytest.raises(InputError, match="2 under OUTPUT"):
        expand(f"{out}/shards/", exclude=str(out))


def test_expand_leaves_out_what_lies_under_output_s3(s3_bucket):
    s3 = boto3.client("s3")
    for key in ("data/shard-000000.tar", "data/labels/shards/shard-000000.tar", "data/labels2/x.tar"):
        s3.put_object(Bucket=s3_bucket, Key=key, Body=b"x")
    base = f"s3://{s3_bucket}/data"
    assert expand(f"{base}/", exclude=f"{base}/labels/") == [f"{base}/labels2/x.tar", f"{base}/shard-000000.tar"]
    with pytest.raises(InputError, match="2 under OUTPUT"):      # a brace pattern: no request per URL
        expand(f"{base}/labels/shards/shard-{{000000..000001}}.tar", exclude=f"{base}/labels")


def test_output_inside_input_labels_then_resumes(tmp_path, tiny_models):
    """The one real label run pair here: the rerun resumes instead of seeing its own shards."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        write_shard(data / f"shard-{i:06d}.tar", photo_samples([(48, 64)], f"k{i}-"))
    out = data / "labels"
    args = ["label", f"{data}/", f"{out}/", "--teacher", tiny_models.teacher, "--sky", "none",
            "--workers", "1", "--batch-size", "2", "--json"]
    first = json.loads(run(*args, check=0).stdout)
    assert (first["shards_committed"], first["shards_total"]) == (2, 2)
    shards = json.loads((out / "job.json").read_text())["shards"]
    again = json.loads(run(*args, check=0).stdout)
    assert (again["shards_committed"], again["shards_skipped"], again["shards_total"]) == (0, 2, 2)
    assert json.loads((out / "job.json").read_text())["shards"] == shards == [
        str(data / "shard-000000.tar"), str(data / "shard-000001.tar")]


# 4. Credentials never appear in a message ------------------------------------------------------

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]        # closed again: nothing listens there


def test_endpoint_password_is_never_printed(tmp_path, raw, tiny_models):
    env = {"AWS_ENDPOINT_URL": f"http://user:s3cretpw@127.0.0.1:{_closed_port()}", "AWS_MAX_ATTEMPTS": "1",
           "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "another-secret-value",
           "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    out = tmp_path / "out"
    for argv in (["status", "s3://bucket/x/"], ["label", "s3://bucket/in/", str(out)],
                 ["label", f"{raw}/", "s3://bucket/out/", "--teacher", tiny_models.teacher, "--sky", "none"]):
        p = run(*argv, env=env, check=2)
        text = p.stdout + p.stderr
        assert "s3cretpw" not in text and "another-secret-value" not in text, text
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
        assert "***@127.0.0.1" in p.stderr or "127.0.0.1" not in p.stderr
    assert not out.exists()


def test_redact_blanks_userinfo_and_secrets(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://me:p%40ss@s3.internal:9000")
    text = ("GET https://me:p%40ss@s3.internal:9000/b/k failed; retried http://u:p@ss@h/x; key wJalrXUtnFEMI; "
            "raw p%40ss; plain s3://bucket/key and user@example.com")
    got = redact(text)
    assert got == ("GET https://***@s3.internal:9000/b/k failed; retried http://***@h/x; key ***; raw ***; "
                   "plain s3://bucket/key and user@example.com")


@pytest.mark.parametrize("error", ["config", "storage", "aborted", "bug"])
def test_cli_redacts_every_error_line(monkeypatch, capsys, error):
    from engine import cli
    from engine.errors import ConfigError, JobAborted

    message = "at http://user:s3cretpw@host:9000/bucket"
    exc = {"config": ConfigError, "storage": StorageError, "aborted": JobAborted, "bug": RuntimeError}[error]

    def fail(args):
        raise exc(message)

    monkeypatch.setitem(cli.COMMANDS, "status", fail)
    code = cli.main(["status", "x"])
    err = capsys.readouterr().err
    assert code == {"config": 2, "storage": 2, "aborted": 1, "bug": 1}[error]
    assert "s3cretpw" not in err and "http://***@host:9000" in err
