"""A ListObjectsV2 page read in one pass, through botocore's own ``before-parse`` hook.

Planning lists 100,000 manifest parts, and on a small driver that listing was CPU-bound: about
half of its time went to botocore's general, shape-driven XML parse of each ``<Contents>``
(six members, each looked up in the operation's model) and a quarter to decoding every key,
escaped or not. This hook takes a successful page's ``<Contents>`` out of the body, reads them
with ElementTree into the dicts botocore would have made (Key, LastModified, ETag, Size,
StorageClass), and leaves botocore the rest of the page (the paging fields) to parse as usual.
Keys come url-decoded, as boto3 would return them, and the page then says no ``EncodingType``,
so boto3 does not decode them twice. Error responses are not touched. tests/test_s3_pages.py
checks that every listing gives what a plain boto3 client gives.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any, Callable
from urllib.parse import unquote

_KEEP = ("Name", "Prefix", "KeyCount", "MaxKeys", "IsTruncated", "ContinuationToken",
         "NextContinuationToken", "StartAfter", "Delimiter", "CommonPrefixes")
_ESCAPED = ("Prefix", "StartAfter", "Delimiter")     # url-encoded with EncodingType=url, as keys are


def parse_contents(parse_timestamp: Callable[[str], Any]):
    """The hook (event ``before-parse.s3.ListObjectsV2``), with the client's timestamp parse."""

    def hook(response_dict: dict, customized_response_dict: dict, **_) -> None:
        body = response_dict.get("body")
        if response_dict.get("status_code") != 200 or not body:
            return
        root = ET.fromstring(body)
        ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
        encoded = (root.findtext(f"{ns}EncodingType") or "").lower() == "url"
        contents = []
        for c in root.iterfind(f"{ns}Contents"):
            key = c.findtext(f"{ns}Key") or ""
            item: dict[str, Any] = {"Key": unquote(key) if encoded and "%" in key else key}
            if (modified := c.findtext(f"{ns}LastModified")) is not None:
                item["LastModified"] = parse_timestamp(modified)
            if (etag := c.findtext(f"{ns}ETag")) is not None:
                item["ETag"] = etag
            if (size := c.findtext(f"{ns}Size")) is not None:
                item["Size"] = int(size)
            if (storage_class := c.findtext(f"{ns}StorageClass")) is not None:
                item["StorageClass"] = storage_class
            contents.append(item)
        rest = ET.Element(root.tag)
        rest.extend(child for child in root if child.tag[len(ns):] in _KEEP)
        if encoded:       # the page's own escaped fields, decoded as boto3 would have
            for e in rest.iter():
                if e.tag[len(ns):] in _ESCAPED and e.text:
                    e.text = unquote(e.text)
        if contents:
            customized_response_dict["Contents"] = contents
        response_dict["body"] = ET.tostring(rest)

    return hook
