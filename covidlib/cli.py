"""The ``covidlib`` command (also ``python -m covidlib``).

Sub-commands: ``run`` (the whole notebook pipeline through papermill), ``download``, ``audit``,
``enhance``, ``train``, ``evaluate``. Heavy libraries are imported only by the sub-command that
needs them, so ``--help`` answers at once.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence


def _params(args: argparse.Namespace) -> dict:
    from covidlib.pipeline import parse_value

    params: dict = {}
    if args.params:
        import yaml

        text = Path(args.params).read_text()
        loaded = yaml.safe_load(text) or {}
        if not isinstance(loaded, dict):
            raise SystemExit(f"{args.params}: expected a mapping of NAME: value")
        params.update(loaded)
    for name, value in args.p or []:
        params[name] = parse_value(value)
    return params


def cmd_run(args: argparse.Namespace) -> int:
    from covidlib import pipeline

    run_dir = pipeline.run(_params(args), nb_dir=Path(args.notebooks) if args.notebooks else None,
                           progress=not args.quiet)
    print(f"done: {run_dir}")
    for name in ("evaluation.json", "results.md"):
        if (run_dir / name).is_file():
            print(f"  {run_dir / name}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from covidlib import download

    if args.list:
        print(download.registry_table())
        return 0
    if not args.name:
        raise SystemExit("name a data set (see --list)")
    print(download.resolve(args.name, dest=args.dest))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from covidlib import audit, datasets

    src = Path(args.source)
    if src.suffix == ".csv" and args.manifest:
        manifest, quarantine = datasets.read_manifest(src), []
    else:
        result = datasets.ingest(args.source, modality=args.modality, seed=args.seed,
                                 patient_pattern=args.patient_pattern)
        print(result.report())
        manifest, quarantine = result.manifest, result.quarantine
    report = audit.audit_manifest(manifest, quarantine=quarantine)
    print(audit.format_audit(report))
    if args.out:
        audit.write_audit(report, args.out)
        print(f"written: {args.out}")
    return 0


def cmd_enhance(args: argparse.Namespace) -> int:
    from covidlib import enhance

    summary = enhance.enhance_tree(args.src, args.dst, pipeline=args.pipeline, workers=args.workers,
                                   progress=not args.quiet, modality=args.modality,
                                   overwrite=args.overwrite)
    short = {k: v for k, v in summary.items() if k != "failed"}
    print(json.dumps(short, indent=2, default=str))
    failed = summary.get("failed") or []
    if failed:
        print(f"{len(failed)} file(s) could not be read; see {Path(args.dst) / 'enhance_failures.csv'}",
              file=sys.stderr)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from covidlib import pipeline, train

    run_dir = pipeline.resolve_run_dir(args.run_dir)
    result = train.train_backbone(
        run_dir, backbone=args.backbone, modality=args.modality, enhancement=args.enhancement,
        img_size=args.img_size, epochs=args.epochs, fine_tune_epochs=args.fine_tune_epochs,
        batch_size=args.batch_size, weights=args.weights, seed=args.seed, overwrite=args.overwrite)
    print(f"model: {result.model_dir}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from covidlib import pipeline, report

    run_dir = pipeline.resolve_run_dir(args.run_dir)
    result = report.evaluate_run(run_dir, args.backbones, xray_backbone=args.xray_backbone,
                                 vote=args.vote, cohort=args.cohort, n_boot=args.n_boot,
                                 seed=args.seed)
    print(f"written: {run_dir / 'evaluation.json'}, {run_dir / 'results.md'}")
    ens = result.evaluation["ensemble"]
    print(f"{ens['method']} vote: accuracy {ens['accuracy']:.3f}, macro AUC {ens['auc_macro']}")
    return 0


def _weights(text: str) -> str | None:
    return None if text.lower() in ("none", "null", "") else text


def build_parser() -> argparse.ArgumentParser:
    from covidlib import __version__

    parser = argparse.ArgumentParser(
        prog="covidlib",
        description="COVID-19 / CAP / normal in chest CT with a chest X-ray first phase "
                    "(research use only, not for clinical decisions).")
    parser.add_argument("--version", action="version", version=f"covidlib {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the numbered notebooks 01-04 with papermill",
                       description="Execute notebooks 01..04 in order (03 once per CT backbone and "
                                   "once for the X-ray model); executed copies go to RUN_DIR/notebooks.")
    p.add_argument("--params", help="YAML file of notebook parameters (NAME: value)")
    p.add_argument("-p", nargs=2, action="append", metavar=("NAME", "VALUE"),
                   help="one parameter, e.g. -p DATASET /data/ct -p EPOCHS 5 (repeatable)")
    p.add_argument("--notebooks", help="folder of the numbered notebooks (default: the checkout's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("download", help="fetch a registered public data set (or list them)")
    p.add_argument("name", nargs="?", help="registry name or Kaggle handle")
    p.add_argument("--dest", help="target folder (default: $COVIDLIB_DATA/<name>)")
    p.add_argument("--list", action="store_true", help="list the registry")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("audit", help="leakage and shortcut audit of a data set or manifest")
    p.add_argument("source", help="data folder, label file, CSV, or a manifest with --manifest")
    p.add_argument("--manifest", action="store_true", help="SOURCE is a covidlib manifest.csv")
    p.add_argument("--modality", default="ct", choices=["ct", "xray"])
    p.add_argument("--patient-pattern", help="regex extracting patient_id from file names")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the audit JSON here")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("enhance", help="enhance a folder or manifest into a mirrored copy",
                       description="Crop / white balance / CLAHE / DCT-denoise every image of SRC "
                                   "into DST (same layout, PNG). Resumable; sources never change.")
    p.add_argument("src", help="image folder or manifest CSV")
    p.add_argument("dst", help="output folder")
    p.add_argument("--pipeline", default="crop+wb+clahe",
                   help="none | crop | crop+wb | crop+clahe | crop+wb+clahe | crop+dct+wb+clahe")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--modality", default="ct", choices=["ct", "xray"])
    p.add_argument("--overwrite", action="store_true", help="redo DST made with other parameters")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_enhance)

    p = sub.add_parser("train", help="train one backbone on RUN_DIR/manifest.csv")
    p.add_argument("--run-dir", help="run folder (default: reports/runs/demo)")
    p.add_argument("--backbone", default="DenseNet121")
    p.add_argument("--modality", default="ct", choices=["ct", "xray"])
    p.add_argument("--enhancement", default="crop+wb+clahe")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--fine-tune-epochs", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--weights", type=_weights, default="imagenet",
                   help="imagenet (default), none, or a weights file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="metrics, vote and two-phase cascade of a run")
    p.add_argument("--run-dir", help="run folder (default: reports/runs/demo)")
    p.add_argument("--backbones", nargs="+", default=["DenseNet121", "ResNet50V2", "MobileNetV2"])
    p.add_argument("--xray-backbone", default="DenseNet121")
    p.add_argument("--vote", default="hard", choices=["hard", "soft", "weighted"])
    p.add_argument("--cohort", help="CSV pairing X-ray and CT by patient_id")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``covidlib`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        # Bad input gets one clear line, not a traceback (COVIDLIB_DEBUG=1 shows it).
        import os

        if os.environ.get("COVIDLIB_DEBUG"):
            raise
        print(f"covidlib {args.command}: error: {exc}", file=sys.stderr)
        return 2
