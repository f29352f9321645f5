"""``depth-engine bench`` reports every figure it promises, consistently. Figures are printed,
never asserted against a time: tests check the report's shape and arithmetic, not speed."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from helpers_cli import offline_cache, run  # noqa: F401 - autouse: offline, a private model cache

TINY = ["--teacher-size", "tiny", "--image-size", "56", "--sky-size", "tiny", "--sky-image-size", "64",
        "--sizes", "96x64,64x96,80x80", "--batch-size", "4"]


def test_bench_reports_four_figures_and_their_ratios(tmp_path, capsys):
    from engine.bench import print_report

    p = run("bench", *TINY, "--images", "8", "--repeats", "2", "--workdir", str(tmp_path), "--json", check=0)
    r = json.loads(p.stdout)
    figures = {k: r[k] for k in ("end_to_end", "model_only", "ray_data", "naive")}
    for name, f in figures.items():
        assert len(f["runs"]) == 2, name
        assert f["min"] <= f["images_per_second"] <= f["max"] and f["min"] > 0, name
        assert f["images"] == 8, name
    for name in ("model_only", "ray_data", "naive"):
        ratio = r["ratios"][f"end_to_end / {name}"]
        assert ratio == pytest.approx(figures["end_to_end"]["images_per_second"] / figures[name]["images_per_second"],
                                      abs=1e-3)
    e2e = r["end_to_end"]
    assert e2e["startup_seconds"] > 0 and 0 < e2e["model_busy_fraction"] <= 1
    assert {"decode", "sky", "teacher", "encode", "write", "commit"} <= set(e2e["stage_seconds"])
    assert r["model_only"]["model_load_seconds"] > 0 and r["ray_data"]["startup_seconds"] >= 0
    # Every pipeline labeled every image: the engine's OUTPUT, Ray Data's tars, the naive tar.
    assert json.loads(run("verify", e2e["output"] + "/run-1/", "--json", check=0).stdout)["ok"]
    ray_keys = set()
    for tar in (tmp_path / "ray-data" / "run-1").glob("*.tar"):
        with tarfile.open(tar) as t:
            ray_keys |= {m.name for m in t.getmembers()}
    assert sum(n.endswith(".disp.png") for n in ray_keys) == 8 and sum(n.endswith(".sky.png") for n in ray_keys) == 8
    with tarfile.open(tmp_path / "naive" / "naive-1.tar") as t:
        assert sum(n.endswith(".disp.png") for n in t.getnames()) == 8

    # The table the command prints without --json, from the same report (no second bench run).
    print_report(r)
    table = capsys.readouterr().out
    assert "engine end to end" in table and "start-up" in table and "Ray Data" in table
    # The same place again would only resume: refused, not timed.
    again = run("bench", *TINY, "--images", "8", "--repeats", "2", "--workdir", str(tmp_path), check=2)
    assert "already holds a bench run" in again.stderr


def test_bench_memory_and_hostile_compare_peak_worker_memory(tmp_path, capsys):
    """One engine-only run with both: shards of N and 10 N images, then N hostile samples beside
    N photos, each in a fresh worker."""
    from engine.bench import print_report

    r = json.loads(run("bench", *TINY, "--images", "5", "--repeats", "1", "--engine-only", "--memory", "--hostile",
                       "--workdir", str(tmp_path), "--json", check=0).stdout)
    m = r["memory"]
    assert (m["small"]["images"], m["large"]["images"]) == (5, 50)
    assert m["large_over_small"] == pytest.approx(m["large"]["peak_worker_rss_mb"] / m["small"]["peak_worker_rss_mb"],
                                                  abs=1e-3)
    assert Path(r["workdir"]) == tmp_path
    h = r["hostile"]
    assert h["ordinary"]["samples_ok"] == 5 and h["ordinary"]["samples_error"] == 0
    assert h["hostile"]["samples_ok"] == 0 and h["hostile"]["samples_error"] == 5     # every one refused
    assert h["hostile_over_ordinary"] == pytest.approx(
        h["hostile"]["peak_worker_rss_mb"] / h["ordinary"]["peak_worker_rss_mb"], abs=1e-3)
    many = h["many_members"]
    assert many["samples_ok"] == 5 and many["shard_mb"] >= 5 * 64                    # 8 x 8 MiB each, carried
    assert h["many_members_over_ordinary"] == pytest.approx(
        many["peak_worker_rss_mb"] / h["ordinary"]["peak_worker_rss_mb"], abs=1e-3)
    print_report(r)
    table = capsys.readouterr().out
    assert "engine end to end" in table and "Ray Data" not in table
    assert "memory: peak worker RSS" in table and "hostile input: peak worker RSS" in table
    assert "many-member samples: peak worker RSS" in table


def test_bench_refuses_bad_arguments(tmp_path):
    for argv, needle in ((["--repeats", "0"], "--repeats"), (["--images", "0"], "--images"),
                         (["--sizes", "big"], "--sizes")):
        p = run("bench", *argv, "--workdir", str(tmp_path), check=2)
        assert needle in p.stderr and "Traceback" not in p.stderr


def test_bench_aspects_times_the_teacher_per_ratio(tmp_path):
    p = run("bench", "--teacher-size", "tiny", "--image-size", "56", "--aspects", "1,2,4", "--repeats", "1",
            "--workdir", str(tmp_path), "--json", check=0)
    rows = json.loads(p.stdout)["aspects"]
    assert [r["aspect"] for r in rows] == [1, 2, 4]
    assert [r["teacher_input"] for r in rows] == ["56x56", "56x112", "56x224"]     # shorter side at the size
    assert [r["tokens"] for r in rows] == [16, 32, 64]
    for r in rows:
        assert r["seconds"] > 0 and r["time_vs_first"] == pytest.approx(r["seconds"] / rows[0]["seconds"], abs=0.01)
    bad = run("bench", "--aspects", "0.5,2", "--workdir", str(tmp_path))
    assert bad.returncode == 2 and "--aspects" in bad.stderr and "Traceback" not in bad.stderr


def test_bench_teachers_puts_each_family_beside_transformers(tmp_path, capsys):
    """In-process, tiny models, two photos: every family has the engine's rate; where transformers
    could run the family's reference, the ratios are the rates' and the maps agree."""
    from engine.bench.teachers import print_teachers, teacher_figures
    from labelers.geometry import FAMILIES

    r = teacher_figures(tmp_path, images=2, repeats=1, scale="tiny")
    rows = {f["family"]: f for f in r["families"]}
    assert list(rows) == list(FAMILIES) and (r["images"], r["repeats"]) == (2, 1)
    ran = 0
    for family, f in rows.items():
        assert f["engine"]["images_per_second"] > 0 and f["teacher_inputs"] and "params" in f["model"], family
        if f["reference"]:
            assert f["reference"] == "needs torchvision" and "pipeline" not in f, family
            continue
        ran += 1
        engine = f["engine"]["images_per_second"]
        for name in ("pipeline", "batched"):
            assert f[f"engine_over_{name}"] == pytest.approx(engine / f[name]["images_per_second"], abs=0.01), family
        assert f["inputs_differ"] == 0 and f["pearson_min"] > 0.999, family
    assert ran >= 3  # depth_anything, dpt and glpn need nothing beyond PIL
    print_teachers(r)
    table = capsys.readouterr().out
    assert all(family in table for family in FAMILIES)


def test_bench_train_puts_the_trainer_beside_its_model_step(tmp_path, capsys):
    """In-process, a tiny student: both figures, their ratio, and runs of the lengths asked for."""
    from engine.bench import print_report
    from engine.bench.train import TrainBench, train_figures
    from engine.cli import build_parser

    bench = TrainBench(hidden=32, heads=2, layers=4, crop=56, shards=2, per_shard=6, sizes=((60, 80), (80, 60)),
                       short=2, long=12, loader_workers=0)
    r = train_figures(tmp_path, bench, repeats=1)
    e, m = r["end_to_end"], r["model_step"]
    assert e["run_seconds"].keys() == {"2", "12"} and len(m["runs"]) == 1
    assert e["steps_per_second"] == pytest.approx(1 / e["seconds_per_step"], rel=1e-2)
    assert m["seconds_per_step"] == m["runs"][0] > 0 and r["loader_seconds_per_batch"] > 0
    assert r["ratio"] == pytest.approx(m["seconds_per_step"] / e["seconds_per_step"], rel=1e-2)
    for steps in (2, 12):    # the real loop ran: one log row per step
        assert len((tmp_path / f"run-{steps}-0" / "log.jsonl").read_text().splitlines()) == steps
    assert build_parser().parse_args(["bench", "--train"]).train
    print_report({"machine": {}, "train": r})
    out = capsys.readouterr().out
    assert "trainer end to end" in out and "model step alone" in out and "end to end / model step" in out
