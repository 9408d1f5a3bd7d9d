"""Calibrate the parity rule: how far do sound float32 artifacts stray from float64?

For many sound models (tests/parity_corpus.py: weights like trained ones, many seeds),
script model.pt and build model.onnx, run the parity engine, and print, per backend, the
distribution of error / floor (the float32 floor: the worst of the eager float32
realizations) over every case and output whose floor is above atol / factor, where the
factor is what decides. The rule's factor must sit well above the largest ratio seen.

    python scripts/calibrate_parity.py [--seeds 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import parity_corpus as corpus
from lstm_export.artifacts import ATOL, FACTOR
from lstm_export.exporters.onnx_graph import save_onnx
from lstm_export.exporters.torchscript import save_torchscript
from lstm_export.verification.folder import verify_artifacts

SIZES = (
    (5, 1, 1),
    (5, 7, 2),
    (12, 16, 3),
    (40, 64, 2),
    (40, 128, 2),
    (64, 256, 2),
)


def corpus_models(seeds: int) -> list[corpus.Sound]:
    models = []
    for seed in range(seeds):
        for input_size, hidden, layers in SIZES:
            for layer_norm, norm_std in ((False, 0.2), (True, 0.2), (True, 0.5)):
                steps = 3 if seed % 2 else 0
                models.append(
                    corpus.Sound(
                        input_size, hidden, layers, layer_norm, norm_std, steps, 100 + seed
                    )
                )
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    ratios: dict[str, list[float]] = {}
    refused = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for sound in corpus_models(args.seeds):
            start = time.perf_counter()
            model = sound.build()
            save_torchscript(model, folder / "model.pt")
            save_onnx(model, folder / "model.onnx")
            report = verify_artifacts(folder / "model.pt", folder / "model.onnx")
            worst = 0.0
            for row in report.results:
                for output, floor in row.floor.items():
                    if row.backend != "eager" and floor > ATOL / FACTOR:
                        ratio = row.error[output] / floor
                        ratios.setdefault(row.backend, []).append(ratio)
                        worst = max(worst, ratio)
            if not report.passed:
                refused.append(sound.id)
            floor_max = max(max(r.floor.values()) for r in report.results)
            print(
                f"{sound.id:<34} {'pass' if report.passed else 'REFUSED'}  "
                f"max floor {floor_max:.1e}  max error/floor {worst:.2f}  "
                f"({time.perf_counter() - start:.1f} s)",
                flush=True,
            )
    print(f"\n{len(corpus_models(args.seeds))} models, {len(refused)} refused: {refused}")
    print("error / floor where the floor decides (floor > atol / factor):")
    summary = {}
    for backend, values in ratios.items():
        q = np.quantile(values, [0.5, 0.9, 0.99, 1.0])
        summary[backend] = {
            "count": len(values),
            "p50": q[0],
            "p90": q[1],
            "p99": q[2],
            "max": q[3],
        }
        print(
            f"  {backend:<24} n={len(values):<5} p50 {q[0]:.2f}  p90 {q[1]:.2f}  "
            f"p99 {q[2]:.2f}  max {q[3]:.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"refused": refused, "ratios": summary}, indent=2))


if __name__ == "__main__":
    main()
