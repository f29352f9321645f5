"""A ListObjectsV2 page read in one pass, through botocore's own ``before-parse`` hook.

Planning lists 100,000 manifest parts, and on a small driver that listing is CPU-bound. botocore
spends it three times over on each page: its check for an error inside a 200 reply parses the
whole body into a tree and drops it, its shape-driven parse then walks every ``<Contents>``
(six members, each looked up in the operation's model), and every key is url-decoded on its own.
Here one ElementTree pass makes the check (a body that does not parse, or an ``<Error>`` root,
becomes a 500 and is retried, exactly as botocore does) and reads the ``<Contents>`` into the
dicts botocore would have made (Key, LastModified, ETag, Size, StorageClass), with the page's
keys url-decoded together; botocore parses the rest of the page (the paging fields) as usual,
and the page then says no ``EncodingType``, so boto3 does not decode keys twice. Every other
S3 operation keeps botocore's own check. tests/test_s3_pages.py checks that every listing gives
what a plain boto3 client gives, garbled pages included.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any, Callable
from urllib.parse import unquote

_KEEP = ("Name", "Prefix", "KeyCount", "MaxKeys", "IsTruncated", "ContinuationToken",
         "NextContinuationToken", "StartAfter", "Delimiter", "CommonPrefixes")
_ESCAPED = ("Prefix", "StartAfter", "Delimiter")     # url-encoded with EncodingType=url, as keys are
_TEXT = ("Key", "ETag", "StorageClass")               # a <Contents> member kept as text; Size and
                                                      # LastModified are converted, the rest dropped
_OPERATION = "ListObjectsV2"


def install(client: Any, parse_timestamp: Callable[[str], Any]) -> None:
    """Read ``client``'s listing pages with :func:`parse_contents`. botocore's 200-error check
    (registered first for every S3 reply) is replaced on this client by one that leaves listing
    pages to the hook, which checks them itself; should botocore rename it, both run, as before."""
    from botocore import handlers

    events, page = client.meta.events, parse_contents(parse_timestamp)
    botocore_check = getattr(handlers, "_handle_200_error", None)
    if botocore_check is None:
        events.register(f"before-parse.s3.{_OPERATION}", page)
        return

    def check(operation_model: Any, response_dict: dict, customized_response_dict: dict, **kwargs) -> None:
        if operation_model.name == _OPERATION:
            page(response_dict, customized_response_dict)
        else:
            botocore_check(operation_model=operation_model, response_dict=response_dict, **kwargs)

    events.unregister("before-parse.s3.*", botocore_check)
    events.register_first("before-parse.s3.*", check)


def parse_contents(parse_timestamp: Callable[[str], Any]):
    """The hook for one listing page, with the client's timestamp parse."""

    def hook(response_dict: dict, customized_response_dict: dict, **_) -> None:
        body = response_dict.get("body")
        if response_dict.get("status_code") != 200 or not body:
            return
        try:
            root = ET.fromstring(body)
        except ET.ParseError:          # a reply cut short: retried, as botocore would
            response_dict["status_code"] = 500
            return
        if root.tag == "Error":        # S3's error inside a 200: retried, as botocore would
            response_dict["status_code"] = 500
            return
        ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
        encoded = (root.findtext(f"{ns}EncodingType") or "").lower() == "url"
        fields = {f"{ns}{field}": field for field in (*_TEXT, "LastModified", "Size")}
        contents = []
        for c in root.iterfind(f"{ns}Contents"):
            item: dict[str, Any] = {}
            for e in c:
                field = fields.get(e.tag)
                if field in _TEXT:
                    item[field] = e.text or ""
                elif field == "LastModified":
                    item[field] = parse_timestamp(e.text)
                elif field == "Size":
                    item[field] = int(e.text)
            item.setdefault("Key", "")
            contents.append(item)
        if encoded:
            _decode_keys(contents)
        rest = ET.Element(root.tag)
        keep, escaped = {f"{ns}{k}" for k in _KEEP}, {f"{ns}{k}" for k in _ESCAPED}
        rest.extend(child for child in root if child.tag in keep)
        if encoded:       # the page's own escaped fields, decoded as boto3 would have
            for e in rest.iter():
                if e.tag in escaped and e.text:
                    e.text = unquote(e.text)
        if contents:
            customized_response_dict["Contents"] = contents
        response_dict["body"] = ET.tostring(rest)

    return hook


def _decode_keys(contents: list[dict]) -> None:
    """Url-decode the page's keys in one call: an encoded key holds no raw newline (it would be
    %0A), so the keys are joined on one, decoded together and split back. A key that decodes to
    a newline adds a piece, and then each is decoded alone."""
    escaped = [i for i, item in enumerate(contents) if "%" in item["Key"]]
    if not escaped:
        return
    keys = unquote("\n".join(contents[i]["Key"] for i in escaped)).split("\n")
    if len(keys) != len(escaped):       # a key that decodes to a newline: one at a time
        keys = [unquote(contents[i]["Key"]) for i in escaped]
    for i, key in zip(escaped, keys):
        contents[i]["Key"] = key
