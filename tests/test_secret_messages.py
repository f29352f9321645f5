"""Credentials in a URL never reach a message, whichever library writes it (issue 27, finding 4).

`s3://KEY:SECRET@bucket/...` is no S3 URL (no bucket name holds an `@`): it is refused on the
driver with one line, and the credentials are remembered so that any text quoting them, with or
without their URL (botocore: 'Invalid bucket name "KEY:SECRET@raw"'), is blanked.
"""
from __future__ import annotations

import logging

import pytest
from helpers_cli import offline_cache, run  # noqa: F401 - autouse: offline, a private model cache

from storage import objectstore
from storage.objectstore import InvalidURL, redact, remember_credentials
from storage.stores import open_store

KEY, SECRET = "AKIAEXAMPLE", "SuperSecret123"
URL = f"s3://{KEY}:{SECRET}@raw/x/"


def _clean(text: str) -> None:
    assert SECRET not in text and KEY not in text, text


@pytest.mark.parametrize("where", ["input", "output", "teacher"])
def test_a_url_with_credentials_is_refused_in_one_line_that_quotes_none(where, tmp_path, s3_bucket, tiny_models):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.tar").write_bytes(b"")
    out = tmp_path / "out"
    argv = {"input": ["label", URL, str(out)],
            "output": ["label", f"{raw}/", URL.replace("raw/x", f"{s3_bucket}/out")],
            "teacher": ["label", f"{raw}/", str(out), "--teacher", URL, "--sky", "none"]}[where]
    p = run(*argv, "--teacher", tiny_models.teacher, "--sky", "none") if where != "teacher" else run(*argv)
    _clean(p.stdout + p.stderr)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "credentials do not go in a URL" in lines[0] and "***@" in lines[0], p.stderr
    assert not out.exists()


def test_remembered_credentials_are_blanked_without_their_url(monkeypatch):
    monkeypatch.setattr(objectstore, "_REMEMBERED", set())
    botocore_text = f'Parameter validation failed: Invalid bucket name "{KEY}:{SECRET}@raw": Bucket name must match'
    assert SECRET in redact(botocore_text)              # the leak: no scheme, so no URL rule applies
    remember_credentials(["label", URL, "out/"])
    assert redact(botocore_text) == 'Parameter validation failed: Invalid bucket name "***@raw": Bucket name must match'
    assert redact(f"key {KEY} and secret {SECRET} apart") == "key *** and secret *** apart"
    with pytest.raises(InvalidURL) as e:
        open_store(URL)
    _clean(str(e.value))


def test_log_records_and_warnings_pass_through_the_redaction(monkeypatch, capsys):
    """A library's log line quoting the arguments' credentials is blanked by the CLI's handler."""
    import warnings

    from engine import cli

    monkeypatch.setattr(objectstore, "_REMEMBERED", set())
    logging.captureWarnings(False)   # as in a fresh process: an earlier in-process main() left it on
    root = logging.getLogger()
    handler = logging.StreamHandler()
    monkeypatch.setattr(root, "handlers", [handler])
    assert cli.main(["status", URL]) == 2
    logging.getLogger("botocore.endpoint").warning("retrying %s:%s@raw", KEY, SECRET)
    try:
        warnings.warn(f"bucket {KEY}:{SECRET}@raw looks odd", UserWarning, stacklevel=1)
    finally:
        logging.captureWarnings(False)
    err = capsys.readouterr().err
    _clean(err)
    assert "retrying ***@raw" in err and "bucket ***@raw looks odd" in err and "credentials do not go" in err
