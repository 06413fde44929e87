"""Manifest CSVs for the UCSD experiment (issue 16).

ucsd_dev.csv: official UCSD train -> split train (covidlib carves val out of it by patient),
official UCSD val -> split test (what the tables report). mosmed_external.csv: ct-mosmed COVID/*
vs NonCOVID/img* (the MosMed slices; the differently sourced nor_* slices are left out).
"""
import csv, sys
from pathlib import Path

shared = Path(sys.argv[1]).resolve()  # ../shared/data
out = Path(sys.argv[2]); out.mkdir(parents=True, exist_ok=True)
ucsd = shared / "ucsd-ct-dev"
patients = {r["path"]: r["patient_id"] for r in csv.DictReader(open(ucsd / "patients.csv"))}
with open(out / "ucsd_dev.csv", "w", newline="") as f:
    w = csv.writer(f); w.writerow(["path", "label", "patient_id", "split"])
    for rel, pid in sorted(patients.items()):
        split = {"train": "train", "val": "test"}[rel.split("/")[0]]
        w.writerow([str(ucsd / rel), rel.split("/")[1], pid, split])
mos = shared / "ct-mosmed"
with open(out / "mosmed_external.csv", "w", newline="") as f:
    w = csv.writer(f); w.writerow(["path", "label"])
    for p in sorted((mos / "COVID").iterdir()):
        w.writerow([str(p), "COVID"])
    for p in sorted((mos / "NonCOVID").glob("img*")):
        w.writerow([str(p), "NonCOVID"])
