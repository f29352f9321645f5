"""``bench --aspects``: what an image's aspect ratio costs the teacher, the figure behind the
``--max-aspect`` rule. The teacher keeps the ratio with its shorter side at its size, so its
tokens grow with the ratio and its attention with their square."""
from __future__ import annotations

import statistics
import time

import numpy as np


def aspect_figures(teacher_path: str, aspects: list[float], *, device: str = "auto", repeats: int = 3,
                   short_side: int = 480) -> list[dict]:
    """Seconds per image through the teacher alone (after a warm-up, median of ``repeats``)
    for images of ``short_side`` x ``short_side * aspect``, and each beside the square's."""
    from labelers.teacher import Teacher

    teacher = Teacher.load(teacher_path, device=device)
    rng = np.random.default_rng(0)
    rows = []
    for aspect in aspects:
        image = rng.integers(0, 256, (short_side, round(short_side * aspect), 3), dtype=np.uint8)
        height, width = teacher.target_size(*image.shape[:2])
        teacher.predict([image])                                   # warm-up
        seconds = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            teacher.predict([image])
            seconds.append(time.perf_counter() - t0)
        rows.append({"aspect": aspect, "teacher_input": f"{height}x{width}",
                     "tokens": (height // 14) * (width // 14), "seconds": round(statistics.median(seconds), 4)})
    base = rows[0]["seconds"]
    for row in rows:
        row["time_vs_first"] = round(row["seconds"] / base, 2)
    return rows
