"""What the commands print for a person (``--json`` prints the same dicts whole)."""
from __future__ import annotations

import json


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
        print(json.dumps(s, indent=2))
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
