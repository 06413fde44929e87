"""Issue 16's UCSD experiment at a GPU budget: the notebooks' library calls (01 ingest, 03 pretrain
+ train, 04 evaluate) in one script, for a GPU machine that has no Jupyter kernel.

Usage: KERAS_BACKEND=jax python gpu_run.py DATA WORK OUT [BACKBONE ...]
  DATA: a folder holding ucsd-ct-dev/ and ct-mosmed/ (as ../shared/data); WORK: run folders;
  OUT: where each variant's evaluation.json / results.md and the table are copied as they finish.
Variants, in this order: SimSiam pretraining then fine-tuning, then from scratch. Sizes and
epochs are the constants below; COVIDLIB_GPU_SMOKE=1 shrinks them for a CPU dry run.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SMOKE = os.environ.get("COVIDLIB_GPU_SMOKE") == "1"
IMG_SIZE = 32 if SMOKE else 224
BATCH = 32
PRETRAIN = dict(PRETRAIN_EPOCHS=1 if SMOKE else 120, EPOCHS=1 if SMOKE else 5,
                FINE_TUNE_EPOCHS=1 if SMOKE else 30, FINE_TUNE_LR=1e-4, PATIENCE=5)
SCRATCH = dict(PRETRAIN_EPOCHS=0, EPOCHS=1 if SMOKE else 40, FINE_TUNE_EPOCHS=0, FINE_TUNE_LR=1e-5,
               PATIENCE=15)


def _shim_papermill() -> None:
    """The GPU image has no Jupyter stack: read the notebooks' parameters cells (literal
    assignments only) with json + ast, as much of papermill / nbformat as covidlib.runner uses."""
    import ast
    import importlib.util
    import types

    if importlib.util.find_spec("papermill") and not os.environ.get("COVIDLIB_FORCE_SHIM"):
        return

    def read(path, as_version=4):
        nb = json.load(open(path))
        return types.SimpleNamespace(cells=[types.SimpleNamespace(
            metadata=c.get("metadata", {}), source="".join(c["source"])) for c in nb["cells"]])

    def inspect_notebook(path):
        src = next(c.source for c in read(path).cells if "parameters" in c.metadata.get("tags", []))
        return {n.targets[0].id: {"default": ast.get_source_segment(src, n.value)}
                for n in ast.parse(src).body if isinstance(n, ast.Assign)}

    sys.modules["papermill"] = types.SimpleNamespace(inspect_notebook=inspect_notebook)
    sys.modules["nbformat"] = types.SimpleNamespace(read=read)


def main() -> None:
    _shim_papermill()
    data, work, out = (Path(a).resolve() for a in sys.argv[1:4])
    backbones = sys.argv[4:] or ["MobileNetV2"]
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(HERE / "make_csv.py"), str(data), str(work)], check=True)
    from covidlib import datasets, pretrain, report, train

    print(train.describe_device(), flush=True)
    for name, p in (("gpu_pretrain", PRETRAIN), ("gpu_scratch", SCRATCH)):
        run_dir = work / name
        t0 = time.time()
        ct = datasets.ingest(str(work / "ucsd_dev.csv"), modality="ct", seed=0, work_dir=run_dir)
        datasets.save_run_manifest(run_dir, {"ct": ct}, {"ct": str(work / "ucsd_dev.csv"), "xray": None})
        for bb in backbones:
            common = dict(backbone=bb, modality="ct", enhancement="crop+wb+clahe", img_size=IMG_SIZE,
                          batch_size=BATCH, seed=0)
            weights = pretrain.pretrain_for_run(run_dir, epochs=p["PRETRAIN_EPOCHS"], weights=None,
                                                verbose=2, **common)
            res = train.train_backbone(run_dir, epochs=p["EPOCHS"], fine_tune_epochs=p["FINE_TUNE_EPOCHS"],
                                       weights=weights, learning_rate=1e-3, fine_tune_lr=p["FINE_TUNE_LR"],
                                       patience=p["PATIENCE"], verbose=2, **common)
            print(f"{name} {bb}: {len(res.history)} epochs, {time.time() - t0:.0f} s so far", flush=True)
        report.evaluate_run(run_dir, backbones=backbones, xray_backbone=None, gradcam_images=4,
                            external_dataset=str(work / "mosmed_external.csv"))
        print(f"{name}: {time.time() - t0:.0f} s", flush=True)
        (out / name).mkdir(exist_ok=True)
        for f in ("evaluation.json", "results.md"):
            shutil.copy(run_dir / f, out / name / f)
        shutil.copy(run_dir / "figures" / "gradcam.png", out / name / "gradcam.png")
        table = subprocess.run([sys.executable, str(HERE / "table.py"), str(work)]
                               + [v for v in ("gpu_pretrain", "gpu_scratch") if (work / v / "evaluation.json").exists()],
                               check=True, capture_output=True, text=True).stdout
        (out / "table_gpu.md").write_text(table)
        print(table, flush=True)


if __name__ == "__main__":
    main()
