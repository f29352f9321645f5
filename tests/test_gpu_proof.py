"""The GPU proof's script runs end to end on a CPU with tiny sizes (so it is ready the day a GPU
comes), and its label comparison is numpy's. Its figures here say nothing about a GPU."""
from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def test_the_script_runs_on_cpu_and_writes_every_section(tmp_path):
    out = tmp_path / "proof.json"
    p = subprocess.run([str(REPO / "deploy" / "gpu-proof.sh"), str(out), "--device", "cpu", "--tiny",
                        "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["environment"]["device"] == "cpu" and r["environment"]["cores"] >= 1
    tests = r["cuda_tests"]
    assert tests["ran"] and tests["exit_code"] == 0 and tests.get("failed") is None
    assert tests["skipped"] >= 1          # the CUDA tests skip without CUDA; the rest pass
    assert len(r["runs"]) == 4            # 1 precision x 2 photo sizes x 2 batch sizes
    for run in r["runs"]:
        alone, flow = run["model_only"]["images_per_second"], run["end_to_end"]["images_per_second"]
        assert alone > 0 and flow > 0 and run["end_to_end"]["cpu_cores_used"] > 0
        assert run["end_to_end_over_model_only"] == pytest.approx(flow / alone, abs=2e-3)
    prof = r["profile"]
    assert prof["images"] == 2 and prof["top"] and all(row["ms"] >= 0 for row in prof["top"])
    assert "bf16_vs_fp32" not in r        # only where both precisions ran (CUDA)


def _output(root: Path, labels: dict[str, np.ndarray]) -> str:
    (root / "shards").mkdir(parents=True)
    with tarfile.open(root / "shards" / "shard-000000.tar", "w") as t:
        for key, d in labels.items():
            buf = io.BytesIO()
            Image.fromarray(np.rint(d * 65535).astype(np.uint16)).save(buf, format="PNG")
            info = tarfile.TarInfo(f"{key}.disp.png")
            info.size = len(buf.getvalue())
            t.addfile(info, io.BytesIO(buf.getvalue()))
    return str(root)


def test_the_label_difference_is_numpys_per_image_worst():
    """Pearson and max |diff| per image, the worst of them, against numpy on the same arrays.
    Checked failing once on purpose: a comparison taking the best image instead of the worst."""
    import tempfile

    from engine.bench.gpu_proof import label_difference

    rng = np.random.default_rng(0)
    a = {f"k{i}": rng.random((20, 30)) for i in range(3)}
    b = {k: np.clip(v + rng.normal(0, 0.01 * (i + 1), v.shape), 0, 1) for i, (k, v) in enumerate(a.items())}
    with tempfile.TemporaryDirectory() as tmp:
        got = label_difference(_output(Path(tmp, "a"), a), _output(Path(tmp, "b"), b))
    qa = {k: np.rint(v * 65535) / 65535 for k, v in a.items()}
    qb = {k: np.rint(v * 65535) / 65535 for k, v in b.items()}
    assert got["images"] == 3
    assert got["pearson_min"] == pytest.approx(min(np.corrcoef(qa[k].ravel(), qb[k].ravel())[0, 1] for k in a), abs=1e-6)
    assert got["max_abs_max"] == pytest.approx(max(np.abs(qa[k] - qb[k]).max() for k in a), abs=1e-6)
    assert got["pearson_min"] < 0.999     # the noisiest image decides
