"""The ``covidlib`` command (also ``python -m covidlib``).

Sub-commands: ``run`` (the whole notebook pipeline through papermill), ``notebooks`` (copy them
for JupyterLab), ``download``, ``audit``, ``enhance``, ``pretrain``, ``train``, ``evaluate``, ``predict``,
``export``. Each is a ``cmd_<name>`` function (what it does) and an ``_add_<name>`` function (its
options), listed in :data:`SUBCOMMANDS`. Heavy libraries are imported only by the sub-command that
needs them, so ``--help`` answers at once.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence


def _yaml_loader():
    """A safe YAML loader that also reads ``1e-4`` as a number (YAML 1.1 needs ``1.0e-4``)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+"
                   r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?)$"), list("-+0123456789."))
    return Loader


def _read_params_file(path: str) -> dict:
    """A ``--params`` YAML file as ``{NAME: value}``; any problem is one ``ValueError`` line."""
    import yaml

    try:
        loaded = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_yaml_loader()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        what = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ValueError(f"{path}: not valid YAML: {what}{where}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file (expected YAML, NAME: value per line)") from None
    except OSError as exc:
        raise ValueError(f"--params {path}: cannot read it ({exc.strerror or exc})") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping of NAME: value, got a {type(loaded).__name__}")
    bad = [k for k in loaded if not isinstance(k, str)]
    if bad:
        raise ValueError(f"{path}: parameter names must be words like EPOCHS, got {bad[:3]}")
    return loaded


def _params(args: argparse.Namespace) -> dict:
    from covidlib.runner import parse_value

    params: dict = {}
    if args.params:
        params.update(_read_params_file(args.params))
    for name, value in args.p or []:
        params[name] = parse_value(value)
    return params


def _allow_inside_input_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-inside-input", action="store_true",
                   help="allow writing the output inside (or beside) the input; refused by default "
                        "so that results never mix with the data")


def _run_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", help="run folder (default: reports/runs/demo)")


class _Subparsers(Protocol):
    """What ``ArgumentParser.add_subparsers()`` returns, as far as the ``_add_*`` functions use it."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser: ...


def cmd_run(args: argparse.Namespace) -> int:
    from covidlib import runner

    run_dir = runner.run(_params(args), nb_dir=Path(args.notebooks) if args.notebooks else None,
                         progress=not args.quiet, verbose=args.verbose, parallel=args.parallel,
                         threads=args.threads)
    for name in ("evaluation.json", "results.md"):
        if (run_dir / name).is_file():
            print(f"  {run_dir / name}")
    return 0


def _add_run(sub: _Subparsers) -> None:
    p = sub.add_parser("run", help="run the numbered notebooks 01-04 with papermill",
                       description="Execute notebooks 01..04 in order (03 once per CT backbone and "
                                   "once for the X-ray model); executed copies go to RUN_DIR/notebooks.")
    p.add_argument("--params", help="YAML file of notebook parameters (NAME: value)")
    p.add_argument("-p", nargs=2, action="append", metavar=("NAME", "VALUE"),
                   help="one parameter, e.g. -p DATASET /data/ct -p EPOCHS 5 (repeatable)")
    p.add_argument("--notebooks", help="folder of the numbered notebooks (default: the copies "
                                       "shipped with covidlib, or $COVIDLIB_NOTEBOOKS)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--verbose", action="store_true",
                   help="show everything the kernels print (TensorFlow logs included)")
    # Ranges are checked by runner.run: 0 or -1 gets the one-line error, not a usage screen.
    p.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="run up to N of the trainings (02, each 03) at once, each on its own GPU "
                        "or CPU cores; 04 waits for all. Same results as a sequential run "
                        "(default 1: one after the other)")
    p.add_argument("--threads", type=int, metavar="T",
                   help="TensorFlow threads per notebook (default: every core). Results depend on "
                        "it, never on --parallel; on CPU, --parallel runs cores/T at once")
    p.set_defaults(func=cmd_run)


def cmd_notebooks(args: argparse.Namespace) -> int:
    from covidlib import runner

    result = runner.copy_notebooks(args.dest, overwrite=args.force)
    for key, paths in result.items():
        for path in paths:
            print(f"{key:<9} {path}")
    if result["kept"]:
        print(f"{len(result['kept'])} edited notebook(s) kept; --force replaces them", file=sys.stderr)
    return 0


def _add_notebooks(sub: _Subparsers) -> None:
    p = sub.add_parser("notebooks", help="copy the numbered notebooks into a folder for JupyterLab",
                       description="Copy notebooks 01-04 into DEST. An edited copy already there is "
                                   "kept unless --force.")
    p.add_argument("dest", help="target folder")
    p.add_argument("--force", action="store_true", help="replace edited copies")
    p.set_defaults(func=cmd_notebooks)


def cmd_download(args: argparse.Namespace) -> int:
    from covidlib import download

    if args.list:
        print(download.registry_table())
        return 0
    if not args.name:
        raise ValueError("name a data set (see covidlib download --list)")
    print(download.resolve(args.name, dest=args.dest))
    return 0


def _add_download(sub: _Subparsers) -> None:
    p = sub.add_parser("download", help="fetch a registered public data set (or list them)")
    p.add_argument("name", nargs="?", help="registry name or Kaggle handle")
    p.add_argument("--dest", help="target folder (default: $COVIDLIB_DATA/<name>)")
    p.add_argument("--list", action="store_true", help="list the registry")
    p.set_defaults(func=cmd_download)


def cmd_audit(args: argparse.Namespace) -> int:
    from covidlib import audit, datasets
    from covidlib.fsutil import check_output_path

    src = Path(args.source)
    if args.out:  # before the (long) ingest and audit: their results must have somewhere to go
        # A covidlib manifest sits in a run folder, not among the images: only never over it.
        inside = args.allow_inside_input or (args.manifest and src.suffix == ".csv")
        check_output_path(args.out, [src], kind="file", what="--out", text=True, allow_inside_input=inside)
    if src.suffix == ".csv" and args.manifest:
        manifest, quarantine = datasets.read_manifest(src), []
    else:
        result = datasets.ingest(args.source, modality=args.modality, seed=args.seed,
                                 patient_pattern=args.patient_pattern)
        print(result.report())
        manifest, quarantine = result.manifest, result.quarantine
    # A run's manifest may hold CT and X-ray: each modality is audited on its own.
    report = audit.audit_by_modality(manifest, quarantine=quarantine)
    print(audit.format_audit_by_modality(report))
    if args.out:
        audit.write_audit(report, args.out)
        print(f"written: {args.out}")
    return 0


def _add_audit(sub: _Subparsers) -> None:
    p = sub.add_parser("audit", help="leakage and shortcut audit of a data set or manifest")
    p.add_argument("source", help="data folder, label file, CSV, or a manifest with --manifest")
    p.add_argument("--manifest", action="store_true", help="SOURCE is a covidlib manifest.csv")
    p.add_argument("--modality", default="ct", choices=["ct", "xray"])
    p.add_argument("--patient-pattern", help="regex extracting patient_id from file names")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the audit JSON here")
    _allow_inside_input_arg(p)
    p.set_defaults(func=cmd_audit)


def cmd_enhance(args: argparse.Namespace) -> int:
    from covidlib import enhance_batch

    summary = enhance_batch.enhance_tree(args.src, args.dst, pipeline=args.pipeline, workers=args.workers,
                                         progress=not args.quiet, modality=args.modality,
                                         overwrite=args.overwrite, allow_inside_input=args.allow_inside_input)
    short = {k: v for k, v in summary.items() if k != "failed"}
    print(json.dumps(short, indent=2, default=str))
    failed = summary.get("failed") or []
    if failed:
        folders = len(summary.get("unreadable_folders") or [])
        counts = ((len(failed) - folders, "file(s)"), (folders, "folder(s)"))
        parts = [f"{n} {kind}" for n, kind in counts if n]
        print(f"{' and '.join(parts)} could not be read; see {Path(args.dst) / 'enhance_failures.csv'}",
              file=sys.stderr)
    return 0


def _add_enhance(sub: _Subparsers) -> None:
    p = sub.add_parser("enhance", help="enhance a folder or manifest into a mirrored copy",
                       description="Crop / white balance / CLAHE / DCT-denoise every image of SRC "
                                   "into DST (same layout, PNG). Resumable; sources never change.")
    p.add_argument("src", help="image folder or manifest CSV")
    p.add_argument("dst", help="output folder")
    p.add_argument("--pipeline", default="crop+wb+clahe",
                   help="none | crop | crop+wb | crop+clahe | crop+wb+clahe | crop+dct+wb+clahe | "
                        "lungcrop | lungcrop+wb | lungcrop+wb+clahe (lungcrop: crop to the lung field)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--modality", default="ct", choices=["ct", "xray"])
    p.add_argument("--overwrite", action="store_true", help="redo DST made with other parameters")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _allow_inside_input_arg(p)
    p.set_defaults(func=cmd_enhance)


# Help of an option whose default is read from a notebook's parameters cell.
_NB_DEFAULT = "default: notebook {} parameters cell"
# CLI option -> the notebook parameter that holds its default (defaults live in one place).
TRAIN_OPTIONS = {"backbone": "BACKBONE", "modality": "MODALITY", "enhancement": "ENHANCEMENT",
                 "img_size": "IMG_SIZE", "epochs": "EPOCHS", "fine_tune_epochs": "FINE_TUNE_EPOCHS",
                 "batch_size": "BATCH_SIZE", "weights": "WEIGHTS", "head": "HEAD",
                 "learning_rate": "LEARNING_RATE", "fine_tune_lr": "FINE_TUNE_LR",
                 "unfreeze": "UNFREEZE", "patience": "PATIENCE", "imbalance": "IMBALANCE",
                 "seed": "SEED", "distribute": "DISTRIBUTE"}
EVALUATE_OPTIONS = {"backbones": "BACKBONES", "xray_backbone": "XRAY_BACKBONE", "vote": "VOTE",
                    "cohort": "COHORT", "phase1_threshold": "PHASE1_THRESHOLD",
                    "uncertainty_band": "UNCERTAINTY_BAND", "clinical_flag_rate": "CLINICAL_FLAG_RATE",
                    "n_boot": "N_BOOT", "gradcam_images": "GRADCAM_IMAGES", "seed": "SEED"}


def _with_defaults(args: argparse.Namespace, step: str, options: dict[str, str]) -> dict:
    """The options the user gave, the rest from the notebook's ``parameters`` cell."""
    from covidlib import runner

    defaults = runner.default_parameters(step)
    return {opt: defaults[name] if getattr(args, opt) is None else getattr(args, opt)
            for opt, name in options.items()}


def _weights(text: str | None) -> str | None:
    return None if text is None or text.lower() in ("none", "null", "") else text


def _unfreeze(text: str) -> str | int:
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("--unfreeze must be all or a positive integer") from None


def cmd_train(args: argparse.Namespace) -> int:
    from covidlib import runner, train

    run_dir = runner.resolve_run_dir(args.run_dir)
    kwargs = _with_defaults(args, "train", TRAIN_OPTIONS)
    kwargs["weights"] = _weights(kwargs["weights"])
    result = train.train_backbone(run_dir, overwrite=args.overwrite, **kwargs)
    print(f"model: {result.model_dir}")
    return 0


def _add_train(sub: _Subparsers) -> None:
    p = sub.add_parser("train", help="train one backbone on RUN_DIR/manifest.csv",
                       description="Enhance (cached) and train one backbone. Every option not given "
                                   "takes the default of notebook 03's parameters cell.")
    _run_dir_arg(p)
    p.add_argument("--backbone", help=_NB_DEFAULT.format("03"))
    p.add_argument("--modality", choices=["ct", "xray"])
    p.add_argument("--enhancement", help="enhancement pipeline, e.g. crop+wb+clahe")
    p.add_argument("--img-size", type=int)
    p.add_argument("--epochs", type=int, help="epochs of phase 1 (the only phase from scratch)")
    p.add_argument("--fine-tune-epochs", type=int, help="with pretrained weights: epochs after unfreezing")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--weights", help="imagenet, none (from scratch), or a backbone weights file")
    p.add_argument("--head", choices=["gap", "gap_dense256"])
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--fine-tune-lr", type=float, help="learning rate after unfreezing")
    p.add_argument("--unfreeze", type=_unfreeze, help="all, or how many top backbone layers to unfreeze")
    p.add_argument("--patience", type=int, help="early-stopping patience of phase 1 (epochs); phase 2 always runs "
                                             "--fine-tune-epochs")
    p.add_argument("--imbalance", choices=["class_weight", "balanced_sampling", "none"])
    p.add_argument("--distribute", choices=["auto", "off", "mirrored", "multiworker", "jax_dataparallel"],
                   help="data-parallel training: auto (all local GPUs when more than one), off, mirrored "
                        "(TensorFlow, one machine), multiworker (TensorFlow, TF_CONFIG), jax_dataparallel "
                        "(JAX, KERAS_DISTRIBUTION_* for several processes); --batch-size is per device")
    p.add_argument("--seed", type=int)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_train)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from covidlib import runner, report

    run_dir = runner.resolve_run_dir(args.run_dir)
    kwargs = _with_defaults(args, "evaluate", EVALUATE_OPTIONS)
    result = report.evaluate_run(run_dir, **kwargs)
    print(f"written: {run_dir / 'evaluation.json'}, {run_dir / 'results.md'}")
    ens = result.evaluation["ensemble"]
    print(f"{ens['method']} vote: accuracy {ens['accuracy']:.3f}, macro AUC {ens['auc_macro']}")
    return 0


def _add_evaluate(sub: _Subparsers) -> None:
    p = sub.add_parser("evaluate", help="metrics, vote and two-phase cascade of a run",
                       description="Every option not given takes the default of notebook 04's "
                                   "parameters cell.")
    _run_dir_arg(p)
    p.add_argument("--backbones", nargs="+", help=_NB_DEFAULT.format("04") + " (BACKBONES)")
    p.add_argument("--xray-backbone", help="phase-1 model, run xray_<NAME> (XRAY_BACKBONE)")
    p.add_argument("--vote", choices=["hard", "soft", "weighted"])
    p.add_argument("--cohort", help="CSV pairing X-ray and CT by patient_id")
    p.add_argument("--phase1-threshold", type=float)
    p.add_argument("--uncertainty-band", type=float)
    p.add_argument("--clinical-flag-rate", type=float, help="simulated cohort only")
    p.add_argument("--n-boot", type=int)
    p.add_argument("--gradcam-images", type=int)
    p.add_argument("--seed", type=int)
    p.set_defaults(func=cmd_evaluate)


def cmd_predict(args: argparse.Namespace) -> int:
    from covidlib import runner, predict

    # Output paths before any model is loaded: computed predictions are never lost to a bad --out.
    inside = args.allow_inside_input
    out, _ = predict.check_outputs(args.paths, out=args.out, gradcam_dir=args.gradcam,
                                   allow_inside_input=inside)
    # With --model-dir alone there is no run; with --run-dir too, the run still supplies vote weights.
    run_dir = None if args.model_dir and not args.run_dir else runner.resolve_run_dir(args.run_dir)
    df = predict.predict_paths(args.paths, run_dir, args.model_dir, vote=args.vote,
                               gradcam_dir=args.gradcam, batch_size=args.batch_size,
                               window=args.window, enhanced=args.already_enhanced,
                               allow_inside_input=inside, tta=args.tta)
    out = _write_predictions_or_rescue(predict, df, out, inside)
    print(predict.format_table(df))
    print(f"{df.attrs['vote']} vote of {', '.join(df.attrs['members'])}; written: {out}")
    n_err = int((df["error"] != "").sum())
    if n_err:
        print(f"{n_err} input(s) could not be read or were refused (too small, blank, an unreadable "
              f"folder); see the error column of {out}", file=sys.stderr)
    return 0


def _add_predict(sub: _Subparsers) -> None:
    p = sub.add_parser("predict", help="predict images with a run's CT models and their vote",
                       description="Predict files or folders (PNG/JPG/BMP/TIFF, DICOM, NIfTI: one row "
                                   "per axial slice) with every CT member of RUN_DIR and their vote. "
                                   "Unreadable files get a row with the error column filled.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files and/or folders (recursive)")
    _run_dir_arg(p)
    p.add_argument("--model-dir", action="append",
                   help="a model folder (RUN_DIR/models/NAME) to use instead of the run's members "
                        "(repeatable)")
    p.add_argument("--out", default="predictions.csv", help="CSV to write (default: predictions.csv)")
    p.add_argument("--gradcam", metavar="DIR", help="write Grad-CAM overlays (per model and vote) here")
    p.add_argument("--vote", choices=["hard", "soft", "weighted"],
                   help="vote rule (default: the run's ensemble method, else hard)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--window", default="lung", help="CT window for DICOM/NIfTI: lung, mediastinum, bone")
    p.add_argument("--already-enhanced", action="store_true",
                   help="inputs already went through the run's enhancement; do not apply it again")
    p.add_argument("--tta", type=int, default=0, metavar="N",
                   help="test-time augmentation: average each model over the first N of 10 fixed views "
                        "(identity, flip, small shifts, flip + shifts) and add a <NAME>:tta_sd spread "
                        "column; 0 = off (default)")
    _allow_inside_input_arg(p)
    p.set_defaults(func=cmd_predict)


def _write_predictions_or_rescue(predict, df, out: Path, inside: bool) -> Path:
    """Write the CSV; if that fails after all (disk full), save it in the temp folder instead."""
    import os
    import tempfile

    try:
        return predict.write_predictions(df, out, allow_inside_input=inside)
    except OSError as exc:
        rescue = Path(tempfile.gettempdir()) / f"covidlib-predictions-{os.getpid()}.csv"
        predict.write_predictions(df, rescue, allow_inside_input=True)  # an emergency copy
        raise OSError(f"could not write {out} ({exc.strerror or exc}); the predictions were saved to "
                      f"{rescue} instead") from None


def cmd_export(args: argparse.Namespace) -> int:
    from covidlib import export, runner

    if args.model_file:
        src = Path(args.model_file)
    else:
        src = runner.resolve_run_dir(args.run_dir) / "models" / args.model
        if not (src / "model.keras").is_file():
            raise FileNotFoundError(f"{src} holds no model.keras (train it, or for the ensemble run "
                                    "`covidlib evaluate` first)")
    formats = args.formats
    if formats is None:
        formats = ["savedmodel", "tflite", "onnx"]
        missing = export.onnx_available()
        if missing:
            formats.remove("onnx")
            print(f"skipping onnx: {missing}", file=sys.stderr)
    paths = export.export_model(src, args.out, formats=formats, allow_inside_input=args.allow_inside_input)
    for fmt, path in paths.items():
        print(f"{fmt:<10} {path}")
    if args.no_verify:
        return 0
    model, _ = export.load_exportable(src)
    images = export.sample_images(int(model.inputs[0].shape[1]), n=args.verify_n)
    diffs = export.verify_export(model, paths, images, atol=args.atol)
    print("max |export - keras| on", len(images), "test images: "
          + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()) + f" (tolerance {args.atol:g})")
    return 0


def _add_export(sub: _Subparsers) -> None:
    p = sub.add_parser("export", help="export a trained model or the ensemble (SavedModel/TFLite/ONNX)",
                       description="Export RUN_DIR/models/NAME (or the saved ensemble) as a TensorFlow "
                                   "SavedModel, a float32 TFLite file and ONNX, then check each export "
                                   "against the Keras model. Inputs: raw grayscale 0..255, (n, S, S, 1).")
    _run_dir_arg(p)
    p.add_argument("--model", default="ensemble", metavar="NAME|ensemble",
                   help="model folder under RUN_DIR/models (default: ensemble)")
    p.add_argument("--model-file", help="a .keras file or model folder instead of --run-dir/--model")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--formats", nargs="+", choices=["savedmodel", "tflite", "onnx"],
                   help="formats to write (default: all; onnx only when tf2onnx/onnx are installed)")
    p.add_argument("--atol", type=float, default=1e-4, help="largest accepted difference (default 1e-4)")
    p.add_argument("--verify-n", type=int, default=4, help="test images for the check (default 4)")
    p.add_argument("--no-verify", action="store_true", help="skip the check against the Keras model")
    _allow_inside_input_arg(p)
    p.set_defaults(func=cmd_export)


# The sub-commands in the order --help lists them. A new one is a cmd_<name> function, an
# _add_<name> function that adds its parser, and one entry here.
def cmd_pretrain(args: argparse.Namespace) -> int:
    """Self-supervised pretraining of one backbone; prints where the weights went."""
    from covidlib.pretrain import pretrain_backbone, read_record

    splits = None if [s.lower() for s in args.splits] == ["all"] else args.splits
    out = pretrain_backbone(
        args.sources, args.out, splits=splits, modality=args.modality, cache_dir=args.cache_dir,
        overwrite=args.overwrite, verbose=2 if args.quiet else "auto",
        allow_inside_input=args.allow_inside_input, epochs=args.epochs, learning_rate=args.lr,
        init_weights=args.init_weights,
        **{k: v for k, v in (("backbone", args.backbone), ("img_size", args.img_size),
                             ("batch_size", args.batch_size), ("seed", args.seed)) if v is not None})
    rec = read_record(out)
    last = rec["history"][-1] if rec.get("history") else {}
    print(f"{out}  ({rec['backbone']}, {rec['img_size']} px, {rec['n_images']} images, "
          f"{rec['epochs']} epochs, loss {last.get('loss', float('nan')):.3f}, "
          f"z_std {last.get('z_std', float('nan')):.4f} of a healthy ~{rec['z_std_healthy']:.4f})")
    if rec.get("unreadable"):
        print(f"  {len(rec['unreadable'])} unreadable file(s) left out; see "
              f"{out.name[:-len('.weights.h5')]}.pretrain.json")
    print(f"  train with: covidlib train --weights {out.parent} ... (or WEIGHTS={str(out.parent)!r})")
    return 0


def _add_pretrain(sub: _Subparsers) -> None:
    from dataclasses import fields

    from covidlib import config
    from covidlib.pretrain import PretrainConfig

    # Static defaults only: the notebook-03 ones (backbone, size, batch, seed) are read when the
    # command runs, so building the parser stays instant for every other sub-command.
    d = {f.name: f.default for f in fields(PretrainConfig)}
    p = sub.add_parser(
        "pretrain", help="self-supervised (SimSiam) pretraining of a backbone on unlabelled images",
        description="Pretrain a backbone with SimSiam on unlabelled images (folders, image files or "
                    "manifest CSVs: their train rows only) and write <out>/<BACKBONE>.weights.h5 "
                    "plus a .pretrain.json record; train with --weights <out> (or WEIGHTS=<out>). "
                    "Resumes after a kill; a finished identical run is reused.")
    p.add_argument("sources", nargs="+", metavar="SRC", help="folders, image files or manifest CSVs")
    p.add_argument("--out", required=True, help="a weights file *.weights.h5, or a folder")
    p.add_argument("--backbone", help=_NB_DEFAULT.format("03") + " (BACKBONE)")
    p.add_argument("--img-size", type=int, help=_NB_DEFAULT.format("03") + " (IMG_SIZE)")
    p.add_argument("--epochs", type=int, default=d["epochs"], help=f"default {d['epochs']}")
    p.add_argument("--batch-size", type=int, help=_NB_DEFAULT.format("03") + " (BATCH_SIZE)")
    p.add_argument("--lr", type=float, default=d["learning_rate"],
                   help=f"peak SGD learning rate, cosine decay (default {d['learning_rate']})")
    p.add_argument("--seed", type=int, help=_NB_DEFAULT.format("03") + " (SEED)")
    p.add_argument("--init-weights", help="start from imagenet or a weights file (default: random)")
    p.add_argument("--splits", nargs="+", default=["train"],
                   help="manifest splits to use (default: train); 'all' uses every row")
    p.add_argument("--modality", choices=list(config.MODALITIES), help="manifest rows of this modality only")
    p.add_argument("--cache-dir", help="decoded-image cache (default <out folder>/.pretrain-cache)")
    p.add_argument("--overwrite", action="store_true", help="pretrain again even if finished")
    p.add_argument("--quiet", action="store_true", help="one line per epoch, no progress bar")
    _allow_inside_input_arg(p)
    p.set_defaults(func=cmd_pretrain)


SUBCOMMANDS: tuple[Callable[[_Subparsers], None], ...] = (
    _add_run, _add_notebooks, _add_download, _add_audit, _add_enhance, _add_pretrain, _add_train,
    _add_evaluate, _add_predict, _add_export)


def build_parser() -> argparse.ArgumentParser:
    """The ``covidlib`` parser: one sub-parser per entry of :data:`SUBCOMMANDS`."""
    from covidlib import __version__

    parser = argparse.ArgumentParser(
        prog="covidlib",
        description="COVID-19 / CAP / normal in chest CT with a chest X-ray first phase "
                    "(research use only, not for clinical decisions).")
    parser.add_argument("--version", action="version", version=f"covidlib {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``covidlib`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, RuntimeError, OSError) as exc:
        # Bad input gets one clear line, not a traceback (COVIDLIB_DEBUG=1 shows it). OSError
        # covers a missing file and also an output that is a folder / not writable / full.
        import os

        if os.environ.get("COVIDLIB_DEBUG"):
            raise
        print(f"covidlib {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _one_line(exc: BaseException) -> str:
    """``exc`` as one line; a bare OSError reads "path: reason" rather than "[Errno 13] ..."."""
    if isinstance(exc, OSError) and len(exc.args) >= 2 and isinstance(exc.args[0], int) and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    else:
        text = str(exc)
    return " ".join(text.split())
