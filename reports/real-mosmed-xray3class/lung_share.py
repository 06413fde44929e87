"""Do the ablation's Grad-CAMs move into the lungs with the lung-field crop? (issue 16)

Usage: python reports/real-mosmed-xray3class/lung_share.py RUN_DIR > lung_share.md

For every enhancement-ablation model in ``RUN_DIR/models/ablation_ct_*`` (SmallCNN, one per
pipeline and seed), the Grad-CAM of its predicted class on each of its test slices, as the model
sees them, and :func:`covidlib.explain.lung_share`: the mean share of the heatmap inside the lung
field against the lung area (what a heatmap spread evenly would score) and the ceiling (the lung
field itself, as coarse as the model's feature map). Reads only.
"""
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from covidlib import explain
from covidlib.arraystore import read_resized
from covidlib.train import load_run


def share(model_dir: Path) -> dict:
    model, classes, cfg = load_run(model_dir)
    df = pd.read_csv(model_dir / "predictions_test.csv")
    images = np.stack([read_resized(p, cfg["img_size"]) for p in df["path"]])
    predicted = df[[f"p_{c}" for c in classes]].to_numpy().argmax(axis=1)
    cams = explain.grad_cam(model, images[..., None].astype("float32"), class_index=predicted)
    return explain.lung_share(images, cams, explain.cam_grid(model))


def main(run_dir: str) -> None:
    rows = {}
    for d in sorted(Path(run_dir, "models").glob("ablation_ct_*_s*")):
        pipeline, seed = d.name[len("ablation_ct_"):].rsplit("_s", 1)
        rows.setdefault(pipeline, []).append(share(d))
    print("| pipeline | Grad-CAM in the lungs (mean over seeds) | per seed | lung area | ceiling | slices with a lung field |")
    print("|---|---|---|---|---|---|")
    for pipeline, res in rows.items():
        ins = [r["cam_in_lungs"] for r in res]
        print(f"| {pipeline} | {np.mean(ins):.3f} | {', '.join(f'{v:.3f}' for v in ins)} | "
              f"{np.mean([r['lung_area'] for r in res]):.3f} | {np.mean([r['ceiling'] for r in res]):.3f} | "
              f"{res[0]['n_lung_field']} of {res[0]['n_images']} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
