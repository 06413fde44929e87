"""Where each variant's Grad-CAMs look: the share inside the lung field, per model (issue 16).

Usage: python reports/ucsd-ct-dev-ssl/lung_share.py WORK VARIANT... > lung_share.md

For each ``WORK/VARIANT`` run, notebook 04's own Grad-CAM step (``report.RunReport.gradcam``)
on the run's test split (UCSD's official validation), which records ``gradcam_lung_share``:
the mean share of each Grad-CAM inside the lung field of up to 64 slices, the lung area (what
a heatmap spread evenly would score) and the ceiling (the lung field itself, as coarse as the
backbones' 3x3 feature maps at 96 px). Nothing in the run folder changes but figures/gradcam.png,
which is drawn again the same.
"""
import sys
from pathlib import Path

from covidlib import report

BACKBONES = ["DenseNet121", "ResNet50V2", "MobileNetV2"]


def main(work: str, variants: list[str]) -> None:
    print("| variant | DenseNet121 | ResNet50V2 | MobileNetV2 | vote | lung area | ceiling | slices (lung field / drawn) |")
    print("|---|---|---|---|---|---|---|---|")
    for v in variants:
        rep = report.RunReport(Path(work) / v, BACKBONES, vote_method="hard", n_boot=10, seed=0)
        rep.member_metrics()
        rep.vote()
        rep.gradcam(4)
        s = rep.evaluation["gradcam_lung_share"]
        cells = " | ".join(f"{s[m]['cam_in_lungs']:.3f}" for m in [*BACKBONES, "vote"])
        print(f"| {v} | {cells} | {s['vote']['lung_area']:.3f} | {s['vote']['ceiling']:.3f} | "
              f"{s['vote']['n_lung_field']} / {s['vote']['n_images']} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
