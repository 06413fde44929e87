"""Tests for covidlib.datasets on tiny trees the tests write themselves (no ../shared, no network)."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from covidlib import config
from covidlib import datasets as D
from covidlib.aliases import format_alias_table, resolve_label
from covidlib.fsutil import slug
from covidlib.layouts import detect_layout
from covidlib.splits import assign_splits

try:
    from malformed import (MALFORMED_EXPECTATIONS, tree_snapshot, write_ct_dicom, write_image,
                           write_malformed_corpus, write_nifti)
except ImportError:  # tests/ turned into a package
    from tests.malformed import (MALFORMED_EXPECTATIONS, tree_snapshot, write_ct_dicom, write_image,
                                 write_malformed_corpus, write_nifti)


@pytest.fixture(autouse=True)
def _isolated_data_dir(tmp_path, monkeypatch):
    # Conversions / synthetic data default to config.data_dir(): keep them inside tmp_path.
    monkeypatch.setenv("COVIDLIB_DATA", str(tmp_path / "covidlib_data"))


_counter = iter(range(10**6))


def distinct_image(size: int = 40) -> np.ndarray:
    """A textured image, different from every other one this helper returns (distinct hashes)."""
    rng = np.random.default_rng(next(_counter) + 1000)
    small = rng.integers(0, 256, (6, 6)).astype(np.uint8)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)


def make_class_tree(root: Path, spec: dict[str, int], ext: str = ".png", names=None) -> list[Path]:
    paths = []
    for cls, n in spec.items():
        for i in range(n):
            name = names(cls, i) if names else f"img {i} ü{ext}"
            paths.append(write_image(root / cls / name, distinct_image()))
    return paths


def one_split_per(df: pd.DataFrame, col: str = "patient_id") -> bool:
    return bool((df.groupby(col)["split"].nunique() == 1).all())


# --------------------------------------------------------------------------- class / split folders


def test_class_folders_aliases_spaces_non_ascii(tmp_path):
    root = tmp_path / "my data ü"
    make_class_tree(root, {"COVID-19": 10, "Normal": 10, "Viral Pneumonia": 10})
    r = D.ingest(root, modality="xray", seed=1)
    m = r.manifest
    assert r.layout == "class_folders"
    assert list(m.columns) == config.MANIFEST_COLUMNS
    assert r.alias_table == {"COVID-19": "covid", "Normal": "normal", "Viral Pneumonia": "cap"}
    assert len(m) == 30 and not r.quarantine
    assert set(m["label"]) == {"covid", "normal", "cap"}
    assert set(m["split"]) == set(config.SPLITS)
    assert (m["modality"] == "xray").all() and (m["source"] == "my data ü").all()
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in m["path"])
    # every class in every split
    assert (D.summarize(m).loc[list(config.SPLITS), ["covid", "cap", "normal"]] > 0).all().all()
    table = format_alias_table(r.alias_table)
    assert "Viral Pneumonia" in table and "cap (CAP)" in table


def test_split_folders_case_insensitive_kept_as_given(tmp_path):
    root = tmp_path / "ds"
    for split, n in (("Train", 6), ("Valid", 3), ("TEST", 3)):
        make_class_tree(root / split, {"Covid": n, "Normal": n}, ext=".jpg")
    r = D.ingest(root)
    assert r.layout == "split_folders"
    folder_split = {"Train": "train", "Valid": "val", "TEST": "test"}
    for p, s in zip(r.manifest["path"], r.manifest["split"]):
        assert folder_split[Path(p).parents[1].name] == s
    assert D.summarize(r.manifest).loc["total", "total"] == 24


def test_train_test_only_gets_val_carved_from_train(tmp_path):
    root = tmp_path / "ds"
    make_class_tree(root / "train", {"covid": 20, "normal": 20})
    make_class_tree(root / "test", {"covid": 5, "normal": 5})
    r = D.ingest(root, seed=3)
    m = r.manifest
    test_files = {str(p) for p in (root / "test").rglob("*.png")}
    assert set(m.loc[m["split"] == "test", "path"]) == {str(Path(p).absolute()) for p in test_files}
    val = m[m["split"] == "val"]
    assert len(val) > 0 and set(val["label"]) == {"covid", "normal"}
    assert all("/train/" in Path(p).as_posix() for p in val["path"])
    assert any("val was carved" in n for n in r.notes)


def test_binary_stays_binary_and_alias_override(tmp_path):
    root = tmp_path / "bin"
    make_class_tree(root, {"COVID": 6, "NonCOVID": 6})
    r = D.ingest(root)
    assert set(r.manifest["label"]) == {"covid", "non_covid"}
    root3 = tmp_path / "three"
    make_class_tree(root3, {"Covid": 6, "Normal": 6, "Viral Pneumonia": 6})
    r = D.ingest(root3, aliases={"Viral Pneumonia": "non_covid"})
    assert r.alias_table["Viral Pneumonia"] == "non_covid"
    assert set(r.manifest["label"]) == {"covid", "normal", "non_covid"}
    assert any("overlap" in w for w in r.warnings)  # normal + non_covid together is flagged


def test_unmapped_class_lists_folders_and_aliases(tmp_path):
    root = tmp_path / "ds"
    make_class_tree(root, {"COVID": 4, "Normal": 4, "Lung_Opacity": 4})
    with pytest.raises(ValueError) as ei:
        D.ingest(root)
    msg = str(ei.value)
    assert "Lung_Opacity" in msg and "COVID" in msg and "Normal" in msg
    assert "Accepted aliases" in msg and "COVID-19" in msg and "NonCOVID" in msg
    assert "aliases={'Lung_Opacity'" in msg
    r = D.ingest(root, aliases={"lung opacity": "cap"})  # matching ignores case / space / '_'
    assert r.alias_table["Lung_Opacity"] == "cap"
    r = D.ingest(root, aliases={"Lung_Opacity": "ignore"})
    assert set(r.manifest["label"]) == {"covid", "normal"} and len(r.manifest) == 8
    assert any("ignored as asked" in n for n in r.notes)
    with pytest.raises(ValueError, match="not a canonical label"):
        D.ingest(root, aliases={"Lung_Opacity": "opacity"})


def test_resolve_label_table():
    for name, lab in [("COVID-19", "covid"), ("covid19", "covid"), ("NCP", "covid"), ("positive", "covid"),
                      ("Covid", "covid"), ("CAP", "cap"), ("CP", "cap"), ("Viral Pneumonia", "cap"),
                      ("bacterial_pneumonia", "cap"), ("Normal", "normal"), ("healthy", "normal"),
                      ("non-COVID", "non_covid"), ("NonCOVID", "non_covid"), ("negative", "non_covid"),
                      ("non_covid", "non_covid")]:
        assert resolve_label(name) == lab, name
    assert resolve_label("Lung Opacity") is None


# --------------------------------------------------------------------------- COVIDx / UCSD / CSV


def _covidx_tree(root: Path, named: bool) -> dict:
    imgs = root / "3A_images"
    rows = {"train": [], "val": [], "test": []}
    cls_code = {"NCP": ("2", "COVID-19"), "CP": ("1", "Pneumonia"), "Normal": ("0", "Normal")}
    pid = 0
    for split, n_pat in (("train", 3), ("val", 1), ("test", 1)):
        for prefix, (num, name) in cls_code.items():
            for _ in range(n_pat):
                pid += 1
                for sl in range(3):
                    fname = f"{prefix}_{pid}_{1000 + pid}_{sl:04d}.png"
                    write_image(imgs / fname, distinct_image())
                    rows[split].append(f"{fname} {name if named else num} 3 4 30 35")
    for split, lines in rows.items():
        (root / f"{split}_COVIDx_CT-3A.txt").write_text("\n".join(lines) + "\n")
    return rows


@pytest.mark.parametrize("named", [False, True])
def test_covidx_label_files(tmp_path, named):
    root = tmp_path / "covidx"
    _covidx_tree(root, named)
    r = D.ingest(root, patient_pattern="covidx")
    m = r.manifest
    assert r.layout == "covidx"
    assert list(m.columns) == config.MANIFEST_COLUMNS + config.BBOX_COLUMNS
    assert len(m) == 45 and not r.quarantine
    assert set(m["label"]) == {"covid", "cap", "normal"}
    row = m[m["path"].str.endswith("NCP_1_1001_0000.png")].iloc[0]
    assert row["patient_id"] == "NCP_1" and row["label"] == "covid" and row["split"] == "train"
    assert (row["xmin"], row["ymin"], row["xmax"], row["ymax"]) == (3, 4, 30, 35)
    assert set(m["split"]) == {"train", "val", "test"}
    assert one_split_per(m)
    assert not any("NO PATIENT IDS" in w for w in r.warnings)


def test_covidx_missing_image_quarantined(tmp_path):
    root = tmp_path / "covidx"
    _covidx_tree(root, named=False)
    with open(root / "train_COVIDx_CT-3A.txt", "a") as f:
        f.write("NCP_999_1_0001.png 2 0 0 10 10\n")
    r = D.ingest(root, patient_pattern=r"^([A-Za-z]+_\d+)_")
    assert len(r.manifest) == 45
    assert [q for q in r.quarantine if "NCP_999" in q["path"] and "not found" in q["reason"]]


def test_covidx_cxr_format(tmp_path):
    root = tmp_path / "cxr"
    lines = {"train": [], "test": []}
    for split, n in (("train", 8), ("test", 3)):
        for i in range(n):
            for lab in ("positive", "negative"):
                fname = f"{split}_{lab}_{i}.png"
                write_image(root / split / fname, distinct_image())
                lines[split].append(f"pat{split}{lab}{i // 2} {fname} {lab} sirm")
    for split, ls in lines.items():
        (root / f"{split}.txt").write_text("\n".join(ls) + "\n")
    r = D.ingest(root, modality="xray")
    m = r.manifest
    assert r.layout == "covidx" and len(m) == 22
    assert set(m["label"]) == {"covid", "non_covid"}
    assert (m["source"] == "sirm").all()
    assert set(m["split"]) == {"train", "val", "test"}
    assert one_split_per(m)


def test_ucsd_split_lists(tmp_path):
    root = tmp_path / "COVID-CT"
    lists = {}
    for cls, folder, ext in (("COVID", "CT_COVID", ".png"), ("NonCOVID", "CT_NonCOVID", ".jpg")):
        for split, n in (("train", 6), ("val", 2), ("test", 2)):
            names = [f"{cls} {split} {i}%{ext}" for i in range(n)]
            for nm in names:
                write_image(root / "Images-processed" / folder / nm, distinct_image())
            lists[(cls, split)] = names
            lf = root / "Data-split" / cls / f"{split}CT_{cls}.txt"
            lf.parent.mkdir(parents=True, exist_ok=True)
            lf.write_text("\n".join(names) + "\n")
    r = D.ingest(root)
    m = r.manifest
    assert r.layout == "ucsd" and len(m) == 20
    assert set(m["label"]) == {"covid", "non_covid"}
    for (cls, split), names in lists.items():
        sub = m[m["path"].map(lambda p: Path(p).name).isin(names)]
        assert len(sub) == len(names) and (sub["split"] == split).all()
        assert (sub["label"] == ("covid" if cls == "COVID" else "non_covid")).all()


def test_csv_with_patients_and_missing_file(tmp_path):
    root = tmp_path / "csvset"
    rows = []
    for i in range(24):
        cls = ["COVID-19", "CAP", "Normal"][i % 3]
        p = write_image(root / "imgs" / f"x {i}.png", distinct_image())
        rows.append({"Path": f"imgs/x {i}.png", "Class": cls, "patient_id": f"P{i // 2}", "source": "hospA"})
    rows.append({"Path": "imgs/missing.png", "Class": "CAP", "patient_id": "P99", "source": "hospA"})
    pd.DataFrame(rows).to_csv(root / "table.csv", index=False)
    r = D.ingest(root / "table.csv")
    m = r.manifest
    assert r.layout == "csv" and len(m) == 24
    assert set(m["source"]) == {"hospA"}
    assert one_split_per(m)
    assert m["patient_id"].nunique() == 12
    assert [q for q in r.quarantine if q["path"].endswith("missing.png") and "not found" in q["reason"]]
    # the same CSV found inside its folder
    assert D.ingest(root).layout == "csv"


def test_csv_needs_path_and_label(tmp_path):
    p = tmp_path / "bad.csv"
    pd.DataFrame({"file": ["a.png"], "what": ["x"]}).to_csv(p, index=False)
    with pytest.raises(ValueError, match="label column"):
        D.ingest(p)


# --------------------------------------------------------------------------- DICOM / NIfTI


def test_dicom_series_and_nifti_converted_source_untouched(tmp_path):
    root = tmp_path / "med src"
    rng = np.random.default_rng(0)
    for pat in ("pat A", "pat B", "pat C"):
        uid = f"1.2.3.{abs(hash(pat)) % 10000}"
        for k, z in enumerate((5.0, -5.0, 0.0)):
            hu = rng.uniform(-1000, 200, (24, 24))
            write_ct_dicom(root / "COVID" / pat / f"{k}.dcm", hu, z=z, instance=k + 1, series_uid=uid,
                           patient_id="ANON")
    for v in range(3):
        vol = rng.uniform(-1000, 200, (24, 24, 4))
        write_nifti(root / "Normal" / f"vol {v}.nii.gz", vol)
    before = tree_snapshot(root)
    work = tmp_path / "work"
    r = D.ingest(root, work_dir=work, seed=0)
    m = r.manifest
    assert tree_snapshot(root) == before  # nothing written into the source
    assert not any((root).rglob("*.png"))
    assert len(m) == 9 + 12 and not r.quarantine
    assert all(Path(p).is_relative_to(work / "converted") and Path(p).suffix == ".png" for p in m["path"])
    dcm_ids = set(m.loc[m["label"] == "covid", "patient_id"])
    assert dcm_ids == {"dcm:COVID/pat A", "dcm:COVID/pat B", "dcm:COVID/pat C"}  # "ANON" not used
    assert set(m.loc[m["label"] == "normal", "patient_id"]) == {f"nii:Normal/vol {v}" for v in range(3)}
    assert one_split_per(m)
    # slices of one series come out in body-axis order: 1.dcm (z=-5), 2.dcm (z=0), 0.dcm (z=5)
    a = sorted(p for p in m["path"] if "/pat A/" in p)
    assert [Path(p).name for p in a] == ["0000_1.png", "0001_2.png", "0002_0.png"]
    assert any("converted 3 DICOM series" in n for n in r.notes)
    # a second run reuses the converted slices and gives the same manifest
    r2 = D.ingest(root, work_dir=work, seed=0)
    pd.testing.assert_frame_equal(r2.manifest, m)
    with pytest.raises(ValueError, match="inside the source"):
        D.ingest(root, work_dir=root)


# --------------------------------------------------------------------------- splits


def _patients_df(n_per_class=(12, 9, 7), seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for c, n in zip(("covid", "cap", "normal"), n_per_class):
        for p in range(n):
            for s in range(int(rng.integers(1, 8))):
                rows.append({"path": f"{c}/{p}/{s}.png", "label": c, "patient_id": f"{c}{p}"})
    return pd.DataFrame(rows)


def test_assign_splits_grouped_stratified_seeded():
    df = _patients_df()
    a = assign_splits(df, seed=5)
    b = assign_splits(df, seed=5)
    assert a["split"].tolist() == b["split"].tolist()
    assert one_split_per(a)
    counts = D.summarize(a)
    assert (counts.loc[list(config.SPLITS), ["covid", "cap", "normal"]] > 0).all().all()
    share = counts.loc[list(config.SPLITS), "total"] / len(df)
    assert 0.5 < share["train"] < 0.85 and 0.05 < share["val"] < 0.3 and 0.05 < share["test"] < 0.3
    others = [assign_splits(df, seed=s)["split"].tolist() for s in range(6, 10)]
    assert any(o != a["split"].tolist() for o in others)
    no_val = assign_splits(df, seed=1, val_fraction=0.0, test_fraction=0.2)
    assert set(no_val["split"]) == {"train", "test"}
    with pytest.raises(ValueError):
        assign_splits(df, val_fraction=0.6, test_fraction=0.5)


def test_patient_pattern_groups_split(tmp_path):
    root = tmp_path / "ds"
    make_class_tree(root, {"covid": 30, "normal": 30}, names=lambda c, i: f"{c}pat{i // 3}_slice{i % 3}.png")
    r = D.ingest(root, patient_pattern=r"^(.+)_slice\d+")
    m = r.manifest
    assert m["patient_id"].nunique() == 20
    assert one_split_per(m)
    with pytest.raises(ValueError, match="matched none"):
        D.ingest(root, patient_pattern=r"^zzz(\d+)")


def test_no_patient_ids_warns_and_near_duplicates_share_split(tmp_path):
    root = tmp_path / "flat"
    make_class_tree(root, {"COVID": 20, "NonCOVID": 20})
    # three images with copies: re-encoded JPEG, resized, and an exact copy in the same class
    for k in range(3):
        base = distinct_image(64)
        write_image(root / "COVID" / f"orig{k}.png", base)
        write_image(root / "COVID" / f"copy{k}.jpg", base)
        write_image(root / "COVID" / f"small{k}.png", cv2.resize(base, (48, 48), interpolation=cv2.INTER_AREA))
    for seed in range(4):
        r = D.ingest(root, seed=seed)
        assert r.warnings and r.warnings[0].startswith("NO PATIENT IDS")
        m = r.manifest
        assert m["patient_id"].is_unique and m["patient_id"].str.startswith("img:").all()
        for k in range(3):
            names = {f"orig{k}.png", f"copy{k}.jpg", f"small{k}.png"}
            splits = set(m.loc[m["path"].map(lambda p: Path(p).name).isin(names), "split"])
            assert len(splits) == 1, (seed, k, splits)


def test_given_splits_with_leaking_patient_warns(tmp_path):
    root = tmp_path / "leaky"
    rows = []
    for split in ("train", "val", "test"):
        for i in range(6):
            p = write_image(root / f"{split}_{i}.png", distinct_image())
            rows.append({"path": p.name, "label": "covid" if i % 2 else "normal", "split": split,
                         "patient_id": "SAME" if i == 0 else f"{split}{i}"})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    r = D.ingest(root)
    assert r.manifest["split"].tolist().count("train") == 6
    assert any("more than one split" in w for w in r.warnings)


# --------------------------------------------------------------------------- quarantine


def test_quarantine_malformed_corpus_nothing_changes(tmp_path):
    root = tmp_path / "data ü"
    make_class_tree(root, {"COVID": 8, "Normal": 8})
    corpus = write_malformed_corpus(root / "Normal")
    (root / "Normal" / "notes.txt").write_text("not an image")
    (root / "Normal" / ".DS_Store").write_bytes(b"\x00\x01")
    before = tree_snapshot(root)
    r = D.ingest(root, work_dir=tmp_path / "work")
    assert tree_snapshot(root) == before
    q = {Path(e["path"]).name: e["reason"] for e in r.quarantine}
    assert all(isinstance(v, str) and v for v in q.values())
    for p in corpus:
        if MALFORMED_EXPECTATIONS[p.name] == "ok":
            assert str(p.absolute()) in set(r.manifest["path"])
        else:
            assert p.name in q, p.name
    assert "notes.txt" in q and "unsupported" in q["notes.txt"]
    assert ".DS_Store" not in q
    assert "blank" in q["all_black.png"] and "too small" in q["tiny_1x1.png"]
    assert "folder" in q["folder_named_like.png"]
    assert len(r.manifest) == 17  # 16 good + the PNG named .bmp


def test_all_unreadable_is_a_clear_error(tmp_path):
    (tmp_path / "d" / "covid").mkdir(parents=True)
    (tmp_path / "d" / "covid" / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match="quarantined"):
        D.ingest(tmp_path / "d")


# --------------------------------------------------------------------------- sources


def test_synthetic_source(tmp_path):
    r = D.ingest("synthetic", modality="xray", seed=0)
    m = r.manifest
    assert r.layout == "csv" and len(m) > 0
    assert set(m["label"]) <= {"covid", "non_covid"} and (m["modality"] == "xray").all()
    assert one_split_per(m)
    assert str(Path(m["path"].iloc[0])).startswith(str(tmp_path / "covidlib_data"))


def test_registry_name_uses_download_resolve(tmp_path, monkeypatch):
    root = tmp_path / "fetched"
    make_class_tree(root, {"COVID": 5, "Normal": 5, "Lung_Opacity": 3})
    fake = types.ModuleType("covidlib.download")
    calls = []
    fake.resolve = lambda name, dest=None: calls.append(name) or root
    # the registry's label map: None = class not used by default
    fake.get_info = lambda name: types.SimpleNamespace(
        label_map={"COVID": "covid", "Normal": "normal", "Lung_Opacity": None}, modality="xray")
    monkeypatch.setitem(sys.modules, "covidlib.download", fake)
    import covidlib

    monkeypatch.setattr(covidlib, "download", fake, raising=False)
    r = D.ingest("tiny-set", modality="xray")
    assert calls == ["tiny-set"] and (r.manifest["source"] == "tiny-set").all()
    assert set(r.manifest["label"]) == {"covid", "normal"} and r.alias_table["Lung_Opacity"] == "ignore"
    r = D.ingest("owner/tiny-set", modality="xray", aliases={"Lung_Opacity": "cap"})  # a Kaggle handle
    assert calls[-1] == "owner/tiny-set" and "cap" in set(r.manifest["label"])
    r = D.ingest("tiny-set")  # modality disagrees with the registry
    assert any("registry lists" in w for w in r.warnings)


def test_detect_layout_is_public(tmp_path):
    # covidlib.runner checks a data set's shape with it before the first notebook runs.
    make_class_tree(tmp_path / "cf", {"covid": 1, "normal": 1})
    make_class_tree(tmp_path / "sf" / "Train", {"covid": 1})
    assert detect_layout(tmp_path / "cf") == ("class_folders", None)
    assert detect_layout(tmp_path / "sf") == ("split_folders", None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="Accepted layouts"):
        detect_layout(tmp_path / "empty")


def test_slug_for_file_names():
    # One helper for the converted-slice folders (ingest) and the Grad-CAM names (predict).
    assert slug("my data ü/../x") == "my_data_.._x"
    assert slug("...") == "data" and slug("", default="image") == "image"
    assert slug("a" * 70 + ".png", limit=60) == "a" * 56 + ".png"


def test_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError):
        D.ingest(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        D.ingest("./nope/data")
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="modality"):
        D.ingest(tmp_path / "d", modality="mri")
    with pytest.raises(ValueError, match="layout"):
        D.ingest(tmp_path / "d", layout="weird")
    with pytest.raises(ValueError, match="no class folders"):
        D.ingest(tmp_path / "d")


# --------------------------------------------------------------------------- manifest I/O


def test_write_read_manifest_roundtrip(tmp_path):
    root = tmp_path / "ds"
    make_class_tree(root, {"covid": 6, "normal": 6})
    m = D.ingest(root).manifest
    out = D.write_manifest(m, root / "manifest.csv", relative=True)
    text = out.read_text()
    assert "covid/img 0 ü.png" in text and str(root) not in text
    back = D.read_manifest(out, check_files=True)
    pd.testing.assert_frame_equal(back[config.MANIFEST_COLUMNS], m[config.MANIFEST_COLUMNS])
    assert not list(root.glob(".manifest.csv.*"))  # no temp files left behind


def test_read_manifest_validation(tmp_path):
    p = tmp_path / "m.csv"
    base = {"path": "a.png", "label": "covid", "patient_id": "P1", "split": "train", "source": "s", "modality": "ct"}
    pd.DataFrame([base, {**base, "label": "COVID-19"}]).to_csv(p, index=False)
    with pytest.raises(ValueError, match=r"label values \['COVID-19'\].*line\(s\) \[3\]"):
        D.read_manifest(p)
    pd.DataFrame([{**base, "split": "dev"}]).to_csv(p, index=False)
    with pytest.raises(ValueError, match="split"):
        D.read_manifest(p)
    pd.DataFrame([{k: v for k, v in base.items() if k != "patient_id"}]).to_csv(p, index=False)
    with pytest.raises(ValueError, match="missing manifest column"):
        D.read_manifest(p)
    with pytest.raises(FileNotFoundError):
        D.read_manifest(tmp_path / "none.csv")
    pd.DataFrame([base]).to_csv(p, index=False)
    assert D.read_manifest(p)["path"].iloc[0] == str(tmp_path / "a.png")


def test_summarize():
    df = pd.DataFrame({"split": ["train", "train", "test", "val"], "label": ["covid", "normal", "covid", "covid"],
                       "patient_id": ["a", "b", "c", "a"]})
    s = D.summarize(df)
    assert list(s.index) == ["train", "val", "test", "total"] and list(s.columns) == ["covid", "normal", "total"]
    assert s.loc["train", "total"] == 2 and s.loc["total", "covid"] == 3
    p = D.summarize(df, unit="patients")
    assert p.loc["total", "total"] == 3


def _same_hash_slice(seed: int) -> np.ndarray:
    """144x128 "CT slice": one body outline plus a texture that averages to zero in every 16x16
    cell, so every seed has the SAME 9x8 dHash while the slices differ (like distinct real CT
    slices, which are often 0-2 hash bits apart)."""
    rng = np.random.default_rng(seed)
    img = np.full((128, 144), 60, np.float32)
    cv2.ellipse(img, (72, 64), (58, 40), 0, 0, 360, 160, -1)
    quad = np.kron(np.array([[1, -1], [-1, 1]], np.float32), np.ones((8, 8), np.float32))
    signs = rng.choice([-1.0, 1.0], size=(8, 9)).astype(np.float32)
    img += 40 * np.kron(signs, np.ones((16, 16), np.float32)) * np.tile(quad, (8, 9))
    return np.clip(img, 0, 255).astype(np.uint8)


def test_distinct_slices_with_equal_hashes_are_not_near_duplicates(tmp_path):
    # Regression: ingest grouped near-duplicates by perceptual hash alone, so distinct CT slices
    # (real ct-mosmed slices: 0-2 bits apart, structure correlation <= 0.87) became "copies" --
    # across classes too -- and given splits got a false "near-duplicate cluster(s) straddle" warning.
    split_root, flat_root = tmp_path / "split", tmp_path / "flat"
    k = 0
    for split in ("train", "val", "test"):
        for cls in ("COVID", "NonCOVID"):
            for i in range(4):
                img = _same_hash_slice(k)
                write_image(split_root / split / cls / f"s{k}.png", img)
                write_image(flat_root / cls / f"s{k}.png", img)
                k += 1
    write_image(flat_root / "COVID" / "copy_of_s0.jpg", _same_hash_slice(0))  # a real copy still groups
    r = D.ingest(split_root)
    assert r.layout == "split_folders"
    assert not any("straddle" in w or "near-duplicate grouping" in w for w in r.warnings), r.warnings
    assert "0 cluster(s) of 2+ images" in r.warnings[0]
    r = D.ingest(flat_root, seed=0)
    m = r.manifest
    assert not any("near-duplicate grouping" in w for w in r.warnings), r.warnings
    assert set(m["split"]) == {"train", "val", "test"}
    names = m["path"].map(lambda p: Path(p).name)
    assert m.loc[names.isin(["s0.png", "copy_of_s0.jpg"]), "split"].nunique() == 1


def test_empty_split_is_warned(tmp_path):
    # Regression: with 2 patients per class the test split came out empty without any warning
    # (the "class absent from a split" check skipped splits that do not exist at all).
    root = tmp_path / "few"
    make_class_tree(root, {"covid": 10, "normal": 10}, names=lambda c, i: f"{c}pat{i // 5}_slice{i % 5}.png")
    r = D.ingest(root, patient_pattern=r"^(.+)_slice\d+", seed=0)
    empty = [s for s in ("val", "test") if s not in set(r.manifest["split"])]
    assert empty, "setup no longer leaves a split empty; adjust the test"
    assert any("EMPTY" in w and str(empty) in w for w in r.warnings), r.warnings
    r = D.ingest(root, patient_pattern=r"^(.+)_slice\d+", seed=0, test_fraction=0.0)
    assert not any("test" in w and "EMPTY" in w for w in r.warnings), r.warnings


def test_unreadable_sub_folder_is_quarantined_and_warned(tmp_path, monkeypatch):
    """Issue #13: os.walk skipped a folder it could not list, silently; its images were just
    missing. Root reads chmod-000 folders, so listing is made to fail for one folder."""
    import errno
    import os

    root = tmp_path / "d"
    for cls in ("covid", "normal"):
        for i in range(3):
            write_image(root / cls / f"{cls}{i}.png", distinct_image())
    locked = root / "normal" / "batch2"
    write_image(locked / "x.png", distinct_image())
    real = os.scandir

    def scandir(path="."):
        if os.path.realpath(path) == str(locked):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    r = D.ingest(root, work_dir=tmp_path / "work")
    q = {e["path"]: e["reason"] for e in r.quarantine}
    assert q[str(locked)].startswith("folder could not be read (Permission denied)")
    assert any("1 folder(s) could not be read" in w for w in r.warnings)
    assert "folder could not be read" in r.report()
