"""What the commands print for a person (``--json`` prints the same dicts whole)."""
from __future__ import annotations

import json
import sys
from contextlib import contextmanager

_result = None     # where print_json writes while json_stdout is in effect


@contextmanager
def json_stdout(restore: bool = True):
    """While a ``--json`` command runs, ``sys.stdout`` is stderr for everything but its result:
    Ray prints its notices (a worker died, ...) to the driver's sys.stdout, which would break
    the JSON a pipe reads. ``restore`` False: it stays so (the program is about to exit)."""
    global _result
    _result, sys.stdout = sys.stdout, sys.stderr
    try:
        yield
    finally:
        if restore:
            sys.stdout, _result = _result, None


def print_json(obj) -> None:
    """The one JSON object a ``--json`` command prints, on the real stdout."""
    print(json.dumps(obj, indent=2), file=_result or sys.stdout, flush=True)


def print_audit(r: dict) -> None:
    s = r["shards"]
    print(f"{r['samples']} samples: {r['ok']} ok, {r['errors']} errors; shards: {s['committed']} committed, "
          f"{s['failed']} failed, {s['pending']} pending of {s['total']}")
    for reason, n in list(r["errors_by_reason"].items())[:10]:
        print(f"  {n:>8}  {reason}")
    if r["source_kind"].get("gt") and r["valid_fraction"]["count"]:
        kinds = ", ".join(f"{n} {k}" for k, n in r["source_kind"].items())
        v = r["valid_fraction"]
        print(f"samples by source: {kinds}; valid fraction of ground truth: mean {v['mean']:.3f}, min {v['min']:.3f}")
    conf = r["confidence"]
    if conf["count"]:
        print(f"teacher confidence (conf_mean): mean {conf['mean']:.3f}, p50 {conf['p50']:.3f}, min {conf['min']:.3f}")
    sky, rng = r["sky_fraction"], r["disparity"]["raw_range"]
    if sky["count"]:
        print(f"sky fraction: mean {sky['mean']:.3f}, p50 {sky['p50']:.3f}, p95 {sky['p95']:.3f}")
    if rng["count"]:
        print(f"raw disparity range: p50 {rng['p50']:.4g}, p95 {rng['p95']:.4g}; "
              f"degenerate labels: {r['disparity']['degenerate']}")
    for kind, f in r["flags"]["samples"].items():
        if f["count"]:
            print(f"flagged {kind}: {f['count']} samples, e.g. {f['samples'][0]['shard']}/{f['samples'][0]['key']}")
    for sh in r["flags"]["shards"]["high_error_rate"]:
        print(f"flagged shard {sh['shard']}: error rate {sh['error_rate']:.1%}")


def print_summary(s: dict, as_json: bool) -> None:
    if as_json:
        print_json(s)
        return
    print(f"shards: {s['shards_committed']} committed now, {s['shards_skipped']} already committed, "
          f"{s['shards_failed']} failed, of {s['shards_total']}")
    print(f"samples: {s['samples_ok']} ok, {s['samples_error']} error")
    print(f"{s['wall_seconds']:.1f} s ({s.get('startup_seconds', 0):.1f} s start-up), "
          f"{s['images_per_second']:.2f} images/s, "
          f"models busy {100 * s['model_busy_fraction']:.0f}% of actor time "
          f"({s.get('layout') or str(s['workers']) + ' worker(s) on ' + (s['device'] or 'n/a')})"
          + (f", GPU {s['gpu_utilization']:.0f}% busy" if s.get("gpu_utilization") is not None else ""))
    stages = s.get("stage_seconds") or {}
    if stages:
        print("worker time by stage: " + ", ".join(f"{k} {v:.1f} s" for k, v in stages.items()))
    e = s.get("estimate")
    if e:
        print(f"estimate at {e['at_shards']} shard(s) done ({e['made_after_seconds']:.1f} s in): "
              f"{e['predicted_images']:,} images in {e['predicted_seconds']:.1f} s; "
              f"actual: {e['actual_images']:,} images in {e['actual_seconds']:.1f} s"
              + (f" (time {e['seconds_error']:+.1%})" if e.get("seconds_error") is not None else ""))
    if s["failed_shards"]:
        print(f"failed: {', '.join(s['failed_shards'])} (see OUTPUT/failed/; rerun with --retry-failed)")


def print_repair(s: dict, as_json: bool) -> None:
    if as_json:
        print_json(s)
        return
    print(f"shards: {s['shards_repaired']} repaired (a new generation each), {s['shards_failed']} failed, "
          f"of {s['shards_to_repair']} with error rows to relabel"
          + (f" matching {s['reason']!r}" if s["reason"] else "")
          + f"; {s['shards_pending']} of {s['shards_total']} not committed (a plain label run labels them)")
    print(f"error rows: {s['rows_targeted']} relabeled: {s['rows_repaired']} ok now, {s['rows_still_error']} "
          f"error again, {s['rows_missing']} no longer in the input (kept)")
    print(f"{s['copied_bytes'] / 2**20:.1f} MiB of members carried over; {s['superseded_removed']} superseded "
          f"tar(s) removed; {s['wall_seconds']:.1f} s" + (f" on {s['layout']}" if s["layout"] else ""))
    if s["failed_shards"]:
        print(f"failed: {', '.join(s['failed_shards'])} (each keeps its previous generation; rerun to retry)")


def print_estimate(e: dict, as_json: bool) -> None:
    """``label --dry-run``: the plan, the images, the rate and where each came from, the projection."""
    if as_json:
        print_json(e)
        return
    from engine.progress import duration

    print(f"dry run of {e['output']} (nothing written): shards {e['shards_total']} total, "
          f"{e['shards_committed']} committed, {e['shards_failed']} failed, {e['shards_pending']} pending"
          + (f"; {e['shards_to_label']} to label" if e["shards_to_label"] != e["shards_pending"] else ""))
    s = e["images_sample"]
    how = e["images_method"]
    if s:
        mib = s["images_per_mib"] or {}
        how += (f"; {s['shards']} of {s['of']} shard(s) counted, extrapolated by bytes"
                + (f", images/MiB {mib['min']:g}..{mib['max']:g}" if mib else "")
                + (f", relative std {s['relative_std']:.1%}" if s.get("relative_std") is not None else "")
                + (f"; standard error {s['relative_standard_error']:.1%}"
                   if s.get("relative_standard_error") is not None else ""))
    print(f"images: ~{e['images']:,} pending ({how})")
    if e["rate"] is None:
        print("rate: none needed (nothing pending)")
        return
    d = e["rate_detail"]
    where = {"given": "--rate",
             "previous run": f"the run recorded in {d.get('record')} ({d.get('layout')})",
             "calibration": f"{d.get('images')} images on {d.get('worker')} ({d.get('device')}) with "
                            f"{d.get('teacher')} and sky {d.get('sky_model')}"}[e["rate_source"]]
    print(f"rate: {e['rate']:.3g} images/s per worker, from {where}")
    startup = f" + {e['startup_seconds']:.0f} s start-up" if e.get("startup_seconds") is not None else ""
    out = f", {_size(e['output_bytes'])} out" if e.get("output_bytes") is not None else ""
    req = f", {e['s3_requests']:,} S3 requests ({e['s3_requests_source']})" if e.get("s3_requests") else ""
    cost = f", ${e['cost']:,.2f} at ${e['price_per_hour']:g}/worker-hour" if e.get("cost") is not None else ""
    print(f"projection on {e['layout']}: {duration(e['wall_seconds'])}{startup}, "
          f"{e['worker_hours']:.3g} worker-hours{out}{req}{cost}")


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return ""
