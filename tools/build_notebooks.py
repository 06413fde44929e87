"""Regenerate notebooks/*.ipynb from this file (the notebooks hold narrative, parameters and calls).

Run: python tools/build_notebooks.py. Outputs are never stored (nbstripout-clean).
"""
from pathlib import Path

import nbformat as nbf

ROOT = Path(__file__).resolve().parents[1]

SETUP = '''# Setup: install covidlib only when it is missing (a fresh Colab or Kaggle kernel). What pip
# installs comes from one place, the COVIDLIB_INSTALL variable: a wheel path or git+<repository URL>.
import importlib, importlib.util, os
if importlib.util.find_spec("covidlib") is None:
    if not os.environ.get("COVIDLIB_INSTALL"):
        raise RuntimeError("covidlib is not installed: set COVIDLIB_INSTALL to a wheel path or "
                           "git+<repository URL> (README: Colab and Kaggle), or pip install it")
    %pip install -q {os.environ["COVIDLIB_INSTALL"]}
    importlib.invalidate_caches()
'''

DISCLAIMER = ("> **Research use only.** covidlib is not a medical device and must never be used "
              "for clinical decisions.")


def md(text):
    return nbf.v4.new_markdown_cell(text.strip())


def code(text, tags=None):
    cell = nbf.v4.new_code_cell(text.strip())
    if tags:
        cell.metadata["tags"] = tags
    return cell


def params(text):
    return code(text, tags=["parameters"])


def notebook(cells):
    nb = nbf.v4.new_notebook()
    nb.cells = cells
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


NB01 = notebook([
    md(f"""
# 01 · Data: download / ingest, manifest, leakage audit

{DISCLAIMER}

Turns a data set (the embedded synthetic phantoms by default, a registry name, or a local folder /
CSV / label file) into one **manifest** (`path, label, patient_id, split, source, modality`) with a
split that keeps every patient in one split, then audits it for leakage and shortcuts.
Writes `RUN_DIR/manifest.csv`, `RUN_DIR/data_audit.json`, `RUN_DIR/quarantine.csv`.
"""),
    code(SETUP),
    params('''
DATASET = "synthetic"        # CT images: synthetic, a registry name, or a folder / CSV / label file
XRAY_DATASET = "synthetic"   # phase-1 X-rays: same choices, or None to skip phase 1
RUN_DIR = None               # None -> reports/runs/demo
SEED = 0
PATIENT_PATTERN = None       # regex giving patient_id from a file name; COVIDx: ^([A-Za-z]+_[0-9]+)_
SYNTHETIC_PATIENTS = 40      # CT patients per class (6 slices each) when DATASET is "synthetic"
SYNTHETIC_XRAY_PATIENTS = 120   # X-ray patients per class (one image each) when XRAY_DATASET is "synthetic"
VAL_FRACTION = 0.15
TEST_FRACTION = 0.15
'''),
    code('''
import covidlib
from covidlib import audit, config, datasets, plots, runner

config.seed_everything(SEED)
run_dir = runner.resolve_run_dir(RUN_DIR)
print("covidlib", covidlib.__version__, "from", covidlib.__file__, "| run folder:", run_dir)
'''),
    md("## CT images → manifest\nThe alias table shows how each folder / class name became a canonical label."),
    code('''
ct = datasets.ingest(DATASET, modality="ct", seed=SEED, patient_pattern=PATIENT_PATTERN,
                     val_fraction=VAL_FRACTION, test_fraction=TEST_FRACTION, work_dir=run_dir,
                     synthetic_patients=SYNTHETIC_PATIENTS)
print(ct.report())
'''),
    md("## Phase-1 X-rays (optional)"),
    code('''
xray = None
if XRAY_DATASET:
    xray = datasets.ingest(XRAY_DATASET, modality="xray", seed=SEED, patient_pattern=PATIENT_PATTERN,
                           val_fraction=VAL_FRACTION, test_fraction=TEST_FRACTION, work_dir=run_dir,
                           synthetic_patients=SYNTHETIC_XRAY_PATIENTS)
    print(xray.report())
'''),
    code('''
results = {"ct": ct} if xray is None else {"ct": ct, "xray": xray}
manifest = datasets.save_run_manifest(run_dir, results, {"ct": DATASET, "xray": XRAY_DATASET})
datasets.summarize(manifest)
'''),
    md("## Leakage and shortcut audit\nDuplicates and near-duplicates across splits, patient overlap, "
       "and image properties that separate the classes on their own (a model could learn those "
       "instead of the disease)."),
    code('''
quarantine = [q for r in results.values() for q in r.quarantine]
report = audit.audit_by_modality(manifest, quarantine=quarantine)  # CT and X-ray audited apart
audit.write_audit(report, run_dir / "data_audit.json")
print(audit.format_audit_by_modality(report))
'''),
    md("## Counts and sample images"),
    code('plots.plot_class_counts(manifest, run_dir / "figures" / "class_counts.png")'),
    code('plots.plot_samples(manifest[manifest.modality == "ct"], n_per_class=4, path=run_dir / "figures" / "samples_ct.png", seed=SEED)'),
    code('''
if xray is not None:
    display(plots.plot_samples(manifest[manifest.modality == "xray"], n_per_class=4,
                               path=run_dir / "figures" / "samples_xray.png", seed=SEED))
'''),
])

NB02 = notebook([
    md(f"""
# 02 · Stage 1 enhancement: crop → white balance → CLAHE (→ DCT denoising), and its ablation

{DISCLAIMER}

AICOV-CT claims enhancement matters. Here each step is shown on a real-looking slice (with its
histogram), then the same quick model and budget is trained on every pipeline, once per seed in
`ABLATION_SEEDS`. Every pipeline is tested on the same patients, so the question is paired: the
verdict is the patient-bootstrap 95% CI of the seed-averaged macro-AUC difference to `none`
(above 0 better, below 0 worse, containing 0 **no demonstrated difference**); accuracy and the
spread across seeds are shown alongside. Writes `RUN_DIR/enhancement_ablation.csv` and `figures/enhancement_*.png`.
"""),
    code(SETUP),
    params('''
RUN_DIR = None               # None -> reports/runs/demo
SEED = 0
IMG_SIZE = 64
BATCH_SIZE = 32
RUN_ABLATION = True          # False: only show the enhancement steps
ABLATION_BACKBONE = "SmallCNN"
ABLATION_EPOCHS = 6          # budget of each ablation run, separate from the EPOCHS of notebook 03
ABLATION_SEEDS = [0, 1, 2]   # one training per pipeline and seed; the verdict needs more than one
ABLATION_PIPELINES = ["none", "crop", "crop+wb", "crop+clahe", "crop+wb+clahe", "crop+dct+wb+clahe", "lungcrop+wb+clahe"]
N_BOOT = 1000
'''),
    code('''
from covidlib import ablation, config, datasets, images, plots, runner

config.seed_everything(SEED)
run_dir = runner.resolve_run_dir(RUN_DIR)
manifest = datasets.read_manifest(run_dir / "manifest.csv")
'''),
    md("## Every step on one CT slice"),
    code('''
sample = manifest[(manifest.modality == "ct") & (manifest.split == "train")].sample(1, random_state=SEED).iloc[0]
print(sample.path, "|", sample.label)
steps = ablation.preview_steps(images.read_image(sample.path), "crop+dct+wb+clahe", modality="ct")
plots.plot_enhancement_steps(steps, run_dir / "figures" / "enhancement_steps_ct.png")
'''),
    md("## Ablation: the same model on each pipeline"),
    code('''
if RUN_ABLATION:
    table = ablation.run_ablation(run_dir, ABLATION_PIPELINES, backbone=ABLATION_BACKBONE, img_size=IMG_SIZE,
                                  epochs=ABLATION_EPOCHS, batch_size=BATCH_SIZE, seeds=ABLATION_SEEDS,
                                  n_boot=N_BOOT)
    display(table)
    display(plots.plot_ablation(table, run_dir / "figures" / "enhancement_ablation.png", metric="auc_macro"))
'''),
])

NB03 = notebook([
    md(f"""
# 03 · Stage 1 training: one backbone

{DISCLAIMER}

Trains a Keras 3 `keras.applications` backbone (DenseNet121, ResNet50V2, MobileNetV2 as in
AICOV-CT; DenseNet201 / ResNet152 as in the seeds' code) with a classification head on the
enhanced images of one modality. Preprocessing is inside the model (raw 0-255 input).
Saves `RUN_DIR/models/<NAME>/`: `model.keras`, `labels.json`, `config.json`, `history.csv`,
`predictions_val.csv`, `predictions_test.csv`. Re-running an identical configuration reuses the
finished run; a killed run resumes. With `PRETRAIN_EPOCHS` > 0 the backbone is first pretrained
self-supervised (SimSiam) on the unlabelled training images into `RUN_DIR/pretrain/`, and training
starts from those weights instead of `WEIGHTS` (no download needed).
"""),
    code(SETUP),
    params('''
RUN_DIR = None               # None -> reports/runs/demo
BACKBONE = "DenseNet121"     # DenseNet121 | ResNet50V2 | MobileNetV2 | DenseNet201 | ResNet152 | SmallCNN
MODALITY = "ct"              # ct | xray
ENHANCEMENT = "crop+wb"      # chosen on validation (README); AICOV-CT's is crop+wb+clahe; lungcrop+wb crops to the lung field
IMG_SIZE = 64
EPOCHS = 10
FINE_TUNE_EPOCHS = 0         # with pretrained WEIGHTS: exactly this many epochs after phase 1 ends
BATCH_SIZE = 32
WEIGHTS = None               # imagenet for real runs (downloaded once), None (from scratch), or a weights file or folder
PRETRAIN_EPOCHS = 0          # SimSiam epochs on the unlabelled train images first (0: off); then set FINE_TUNE_EPOCHS too
HEAD = "gap"                 # gap | gap_dense256
LEARNING_RATE = 0.003        # Adam; chosen on validation from scratch (README: From-scratch training)
FINE_TUNE_LR = 1e-05         # learning rate after unfreezing (far below LEARNING_RATE)
UNFREEZE = "all"             # all, or how many top backbone layers to unfreeze (1 to the backbone layer count)
PATIENCE = 5                 # early stopping of phase 1 only: epochs without a better validation AUC
IMBALANCE = "class_weight"   # class_weight | balanced_sampling | none
DISTRIBUTE = "off"           # off | auto | mirrored | multiworker | jax_dataparallel (BATCH_SIZE is per device)
SEED = 0
'''),
    code('''
from covidlib import config, plots, pretrain, runner, train

config.seed_everything(SEED)
run_dir = runner.resolve_run_dir(RUN_DIR)
print(train.describe_device())
'''),
    md("""
## Self-supervised pretraining (optional)

With `PRETRAIN_EPOCHS` > 0: SimSiam on the training split's images, labels unused (validation and
test images never seen), starting from `WEIGHTS`. It writes `RUN_DIR/pretrain/<BACKBONE>.weights.h5`
(X-ray: `RUN_DIR/pretrain/xray/`) and its `.pretrain.json` (loss and collapse monitor per epoch);
training below then loads it like ImageNet weights: phase 1 on the frozen backbone, phase 2
fine-tunes for `FINE_TUNE_EPOCHS`. Resumes after a kill; a finished identical run is reused.
"""),
    code('''
weights = pretrain.pretrain_for_run(
    run_dir, backbone=BACKBONE, modality=MODALITY, enhancement=ENHANCEMENT, img_size=IMG_SIZE,
    epochs=PRETRAIN_EPOCHS, batch_size=BATCH_SIZE, seed=SEED, weights=WEIGHTS, verbose=2)
'''),
    md("## Training"),
    code('''
result = train.train_backbone(
    run_dir, backbone=BACKBONE, modality=MODALITY, enhancement=ENHANCEMENT, img_size=IMG_SIZE,
    epochs=EPOCHS, fine_tune_epochs=FINE_TUNE_EPOCHS, batch_size=BATCH_SIZE, weights=weights,
    head=HEAD, learning_rate=LEARNING_RATE, fine_tune_lr=FINE_TUNE_LR, unfreeze=UNFREEZE,
    patience=PATIENCE, imbalance=IMBALANCE, distribute=DISTRIBUTE, seed=SEED, verbose=2)
print("saved to", result.model_dir, "| classes:", result.classes,
      "| reused finished run" if result.skipped else "")
'''),
    md("## Learning curves"),
    code('plots.plot_training_curves(result.history, run_dir / "figures" / f"curves_{result.model_dir.name}.png", title=result.model_dir.name)'),
])

NB04 = notebook([
    md(f"""
# 04 · Stage 2 and phase 2: evaluation, voting, the two-phase X-ray → CT cascade

{DISCLAIMER}

Evaluates each CT backbone on the test split (AUC from probabilities; for the hard vote from its
ranking score, which is not a probability and gets no calibration; 95% bootstrap CIs over
patients, calibration, patient-level metrics), combines them by vote (**hard** majority: ties go
to the tied class with the highest mean probability; **soft**: mean probability; **weighted**:
weights fitted on validation), and runs the two-phase routing: X-ray positive → CT; X-ray
negative → CT only if clinically flagged or the X-ray probability is in the uncertainty band.
Without a cohort file pairing each patient's X-ray and CT, the cohort is a clearly labelled
**simulation** pairing patients of the same status. Writes `RUN_DIR/evaluation.json`,
`RUN_DIR/results.md` and `RUN_DIR/figures/`.
"""),
    code(SETUP),
    params('''
RUN_DIR = None               # None -> reports/runs/demo
BACKBONES = ["DenseNet121", "ResNet50V2", "MobileNetV2"]
XRAY_BACKBONE = "DenseNet121"   # phase-1 model, trained by notebook 03 with MODALITY xray
VOTE = "hard"                # hard | soft | weighted
COHORT = None                # CSV pairing X-ray and CT by patient_id (+ clinical_flag); None -> simulated pairing
PHASE1_THRESHOLD = 0.5
UNCERTAINTY_BAND = 0.15
CLINICAL_FLAG_RATE = 0.1     # simulated cohort only
N_BOOT = 1000
GRADCAM_IMAGES = 4
TTA_VIEWS = 0                # 0 off; 1 to 10 test-time augmentation views (identity, flip, small shifts)
EXTERNAL_DATASET = None      # another CT data set to evaluate the trained models on (external validation)
EXTERNAL_PATIENT_PATTERN = None   # patient-id regex for EXTERNAL_DATASET
SEED = 0
'''),
    code('''
from IPython.display import Image, Markdown
from covidlib import config, report, runner, train

config.seed_everything(SEED)
run_dir = runner.resolve_run_dir(RUN_DIR)
print(train.describe_device())
'''),
    md("## Load the predictions\nEvery trained backbone saved its validation and test predictions "
       "(notebook 03); nothing is re-run here. Rows are aligned by image across models."),
    code("rep = report.RunReport(run_dir, BACKBONES, vote_method=VOTE, n_boot=N_BOOT, seed=SEED)"),
    md("## Stage 1: each backbone on the test split\nAccuracy, macro F1 and macro AUC (from "
       "probabilities), 95% CIs from a bootstrap over patients."),
    code("rep.member_metrics()"),
    md("## Stage 2: the vote\n**hard**: majority, ties to the highest mean probability; its output is a "
       "ranking score (AUC, no calibration). **soft** / **weighted**: mean probability (weights fitted "
       "on validation). Writes `predictions_test_vote.csv` with `votes` and `agreement` per image."),
    code("rep.vote()"),
    md("## Two-phase X-ray -> CT cascade\nX-ray positive -> CT; X-ray negative -> CT only if clinically "
       "flagged or within the uncertainty band. Without `COHORT` the pairing of X-ray and CT patients is "
       "a clearly labelled **simulation**."),
    code('''
rep.two_phase(XRAY_BACKBONE, cohort=COHORT, threshold=PHASE1_THRESHOLD, band=UNCERTAINTY_BAND,
              flag_rate=CLINICAL_FLAG_RATE)
'''),
    md("## Calibration\nECE before and after temperature scaling (fitted on validation) and reliability "
       "diagrams, for outputs that are probabilities only (none for the hard vote's score)."),
    code("rep.calibration()"),
    md("## Figures\nConfusion matrices (counts and row-normalised), ROC curves and the 5×5 test grid "
       "(`N=index | P=predicted | GT=truth`, green right, red wrong)."),
    code('''
for name, path in rep.figures_and_grid().items():
    print(name)
    display(Image(filename=str(path)))
'''),
    md("## Grad-CAM\nWhere each backbone and the vote look, on a few test images."),
    code('''
cam = rep.gradcam(GRADCAM_IMAGES)
if cam is not None:
    display(Image(filename=str(cam)))
'''),
    md("## External validation (optional)\nThe trained models, unchanged, on another CT data set."),
    code('''
if EXTERNAL_DATASET:
    display(rep.external(EXTERNAL_DATASET, EXTERNAL_PATIENT_PATTERN)["models"])
'''),
    md("## Test-time augmentation (optional)\nEach model averaged over `TTA_VIEWS` fixed views; the "
       "spread across views is a per-image uncertainty; patient-level metrics and the paired "
       "difference to plain predictions."),
    code('''
if TTA_VIEWS:
    display(rep.tta(TTA_VIEWS))
'''),
    md("## Write the report\n`evaluation.json`, `results.md`, and the vote saved as one Keras model."),
    code('''
result = rep.write()
Markdown((run_dir / "results.md").read_text().split("## Figures")[0])
'''),
])

if __name__ == "__main__":
    out = ROOT / "covidlib" / "notebooks"
    out.mkdir(exist_ok=True)
    for name, nb in [("01_download_data", NB01), ("02_enhancement_ablation", NB02),
                     ("03_train_backbone", NB03), ("04_two_phase_evaluation_voting", NB04)]:
        for i, cell in enumerate(nb.cells):  # stable ids: a rebuild changes only what changed
            cell.id = f"{name[:2]}-{i:02d}"
        nbf.validate(nb)
        nbf.write(nb, out / f"{name}.ipynb")
        print("wrote", out / f"{name}.ipynb")
