"""Tests for covidlib.audit: hashes, duplicates, leakage, patient ids, shortcut detection."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from covidlib import audit
from covidlib.audit import (
    audit_manifest,
    format_audit,
    hamming_distance,
    near_duplicate_groups,
    perceptual_hash,
    write_audit,
)


def texture(seed: int, size: int = 128, lo: float = 30, hi: float = 220, grid: int = 12) -> np.ndarray:
    """A smooth random 'anatomy' (upsampled noise): distinct seeds give unrelated images."""
    rng = np.random.default_rng(seed)
    small = rng.random((grid, grid)).astype(np.float32)
    img = cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)
    img = (img - img.min()) / (img.max() - img.min() + 1e-9)
    return (lo + img * (hi - lo)).astype(np.uint8)


def variant(img: np.ndarray, seed: int = 0) -> np.ndarray:
    """Noised, JPEG re-encoded copy of ``img``."""
    rng = np.random.default_rng(seed)
    noisy = np.clip(img.astype(np.float32) + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
    ok, enc = cv2.imencode(".jpg", noisy, [cv2.IMWRITE_JPEG_QUALITY, 70])
    assert ok
    return cv2.imdecode(enc, cv2.IMREAD_GRAYSCALE)


def save(path: Path, img: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)
    return str(path)


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*")) if p.is_file()
    }


# ---- hashes -----------------------------------------------------------------------------------

def test_perceptual_hash_basic_properties():
    a = texture(1)
    h = perceptual_hash(a)
    assert isinstance(h, int) and 0 <= h < 2**64
    assert perceptual_hash(a) == h
    assert perceptual_hash(np.full((50, 60), 7, np.uint8)) == 0
    assert perceptual_hash(a[:, :, None]) == h
    # Same picture as uint16 / resized / re-encoded stays within a couple of bits.
    assert hamming_distance(perceptual_hash(a.astype(np.uint16) * 257), h) <= 1
    assert hamming_distance(perceptual_hash(cv2.resize(a, (64, 64), interpolation=cv2.INTER_AREA)), h) <= 2
    assert hamming_distance(perceptual_hash(variant(a)), h) <= 2
    assert hamming_distance(perceptual_hash(texture(2)), h) > 6
    with pytest.raises(ValueError):
        perceptual_hash(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError):
        perceptual_hash(np.zeros((0, 5), np.uint8))


def test_near_duplicate_groups_arrays_and_hashes():
    a, b, c = texture(1), texture(2), texture(3)
    groups = near_duplicate_groups([a, b, variant(a), c, variant(b, seed=5)])
    assert groups[0] == groups[2]
    assert groups[1] == groups[4]
    assert len({groups[0], groups[1], groups[3]}) == 3
    assert groups == [0, 1, 0, 2, 1]
    hashes = [perceptual_hash(x) for x in (a, b, variant(a))]
    assert near_duplicate_groups(hashes) == [0, 1, 0]
    assert near_duplicate_groups([]) == []
    with pytest.raises(ValueError):
        near_duplicate_groups([a], threshold=65)


def test_near_duplicate_groups_confirmation_rejects_same_outline():
    # Two different "slices" with the same bright disc outline: the 64-bit hash cannot tell them
    # apart, the structure confirmation can.
    def slice_(seed):
        img = np.zeros((256, 256), np.uint8)
        cv2.circle(img, (128, 128), 110, 150, -1)
        cv2.ellipse(img, (85, 128), (35, 60), 0, 0, 360, 40, -1)  # "lungs"
        cv2.ellipse(img, (171, 128), (35, 60), 0, 0, 360, 40, -1)
        inner = texture(seed, 256, 0, 60, grid=24)  # fine "vessels": averaged away at 9x8
        mask = img > 0
        img[mask] = np.clip(img[mask].astype(int) + inner[mask] - 30, 0, 255)
        return img

    s1, s2 = slice_(14), slice_(15)
    assert hamming_distance(perceptual_hash(s1), perceptual_hash(s2)) <= 6
    assert near_duplicate_groups([s1, s2], min_correlation=None) == [0, 0]
    assert near_duplicate_groups([s1, s2]) == [0, 1]
    assert near_duplicate_groups([s1, variant(s1)]) == [0, 0]
    pre = [(perceptual_hash(x), audit.structure_signature(x)) for x in (s1, s2, variant(s1))]
    assert near_duplicate_groups(pre) == [0, 1, 0]


def test_near_duplicate_groups_paths(tmp_path):
    a = save(tmp_path / "a.png", texture(1))
    b = save(tmp_path / "b.jpg", variant(texture(1)))
    c = save(tmp_path / "c.png", texture(2))
    assert near_duplicate_groups([a, b, Path(c)]) == [0, 0, 1]


# ---- manifest audit -------------------------------------------------------------------------

def _leaky_set(tmp_path: Path) -> pd.DataFrame:
    rows = []
    seed = 100
    for split in ("train", "val", "test"):
        for label in ("covid", "normal"):
            for k in range(4):
                seed += 1
                p = save(tmp_path / split / label / f"{label}_p{seed}_{k}.png", texture(seed))
                rows.append(dict(path=p, label=label, patient_id=f"p{seed}", split=split, source="s", modality="ct"))
    df = pd.DataFrame(rows)
    # Exact copy of a train image in test.
    src = Path(df.loc[0, "path"])
    dup = tmp_path / "test" / "covid" / "copy_of_train.png"
    shutil.copy(src, dup)
    rows.append(dict(path=str(dup), label="covid", patient_id="pdup", split="test", source="s", modality="ct"))
    # Near copy (noised, re-encoded) of another train image in val.
    img = cv2.imread(df.loc[1, "path"], cv2.IMREAD_GRAYSCALE)
    near = save(tmp_path / "val" / "covid" / "near_copy.jpg", variant(img))
    rows.append(dict(path=near, label="covid", patient_id="pnear", split="val", source="s", modality="ct"))
    # A patient in two splits.
    p = save(tmp_path / "test" / "normal" / "overlap.png", texture(999))
    rows.append(dict(path=p, label="normal", patient_id=df.loc[5, "patient_id"], split="test", source="s", modality="ct"))
    return pd.DataFrame(rows)


def test_audit_finds_duplicates_and_patient_overlap(tmp_path):
    df = _leaky_set(tmp_path)
    before = snapshot(tmp_path)
    rep = audit_manifest(df, quarantine=[{"path": "x.png", "reason": "broken"}])
    assert snapshot(tmp_path) == before  # read-only

    assert rep["n_images"] == len(df) == rep["n_readable"]
    assert rep["counts"]["by_split"]["test"]["covid"] == 5
    assert rep["counts"]["by_class"] == {"covid": 14, "normal": 13}

    ex = rep["exact_duplicates"]
    assert ex["n_clusters"] == 1 and ex["n_cross_split_clusters"] == 1
    assert set(ex["clusters"][0]["paths"]) == {df.loc[0, "path"], str(tmp_path / "test/covid/copy_of_train.png")}
    assert ex["clusters"][0]["splits"] == ["test", "train"]

    nd = rep["near_duplicates"]
    clusters = [set(c["paths"]) for c in nd["clusters"]]
    near = str(tmp_path / "val/covid/near_copy.jpg")
    assert {df.loc[1, "path"], near} in clusters
    # The exact copy is of course a near duplicate too; nothing else is.
    assert nd["n_clusters"] == 2 and nd["n_images"] == 4
    assert nd["n_cross_split_pairs"] == 2

    po = rep["patient_overlap"]
    assert po["checked"] and po["n_patients"] == 1
    assert po["patients"][0]["patient_id"] == df.loc[5, "patient_id"]
    assert rep["patient_ids"]["status"] == "real"
    assert rep["quarantine"] == [{"path": "x.png", "reason": "broken"}]
    text = " ".join(rep["warnings"])
    assert "byte-identical" in text and "near-duplicate" in text and "more than one split" in text
    assert not rep["shortcuts"]["flagged"]
    json.dumps(rep, allow_nan=False)


def _two_class_set(tmp_path: Path, frankenstein: bool, n: int = 30) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for label in ("covid", "normal"):
        for k in range(n):
            seed = 1000 * (label == "covid") + k
            if frankenstein:
                if label == "covid":
                    size, lo, hi, src, border = 512, 60, 230, "hospital_a", False
                else:
                    size, lo, hi, src, border = 256, 10, 150, "hospital_b", True
            else:
                size = int(rng.choice([256, 512]))
                lo, hi, src, border = 30, 200, str(rng.choice(["hospital_a", "hospital_b"])), bool(rng.random() < 0.5)
            img = texture(seed, size, lo, hi)
            if border:
                b = size // 10
                img[:b], img[-b:], img[:, :b], img[:, -b:] = 0, 0, 0, 0
            p = save(tmp_path / label / f"{k:03d}.png", img)
            rows.append(dict(path=p, label=label, patient_id=f"{label}{k}", split="train", source=src, modality="ct"))
    return pd.DataFrame(rows)


def test_frankenstein_set_is_flagged(tmp_path):
    df = _two_class_set(tmp_path, frankenstein=True)
    rep = audit_manifest(df)
    sc = rep["shortcuts"]
    for prop in ("width", "height", "source", "mean", "black_fraction"):
        assert prop in sc["flagged"], prop
        r = sc["properties"][prop]
        assert r["shortcut"] is True
        assert r["balanced_accuracy"] >= 0.9
        assert set(r["separable_classes"]) == {"covid", "normal"}
    assert sc["properties"]["width"]["by_class"]["covid"]["median"] == 512
    assert "name_pattern" not in sc["flagged"]  # same naming in both classes
    assert any(w.startswith("SHORTCUT: 'width'") for w in rep["warnings"])
    assert "SHORTCUT" in format_audit(rep)


def test_mixed_set_is_not_flagged(tmp_path):
    rep = audit_manifest(_two_class_set(tmp_path, frankenstein=False))
    assert rep["shortcuts"]["flagged"] == []
    assert not any("SHORTCUT" in w for w in rep["warnings"])


def _scanner_per_patient_set(tmp_path: Path, n_pat: int = 10, per: int = 6) -> pd.DataFrame:
    """Every patient's slices share a scanner name of their own; nothing else differs by class."""
    rows = []
    for label in ("covid", "normal"):
        for i in range(n_pat):
            pid = f"{label}{i:02d}"
            for k in range(per):
                img = texture(10_000 * (label == "covid") + 100 * i + k, size=64)
                rows.append(dict(path=save(tmp_path / label / f"p{i}_{k}.png", img), label=label,
                                 patient_id=pid, split="train", source=f"scanner-{pid}", modality="ct"))
    return pd.DataFrame(rows)


def test_shortcut_check_splits_by_patient(tmp_path):
    # A value that only recognises the patient predicts the class under image folds (the
    # patient's other slices are in training) but not under patient folds: not a class shortcut.
    df = _scanner_per_patient_set(tmp_path)
    sc = audit_manifest(df)["shortcuts"]
    assert sc["cv_split"].startswith("StratifiedGroupKFold by patient_id (20 patients")
    assert "StratifiedGroupKFold" in sc["criterion"]
    assert "source" not in sc["flagged"]
    assert sc["properties"]["source"]["balanced_accuracy"] <= 0.6
    # Without usable ids (none, or one per image) the images are folded as if independent.
    for d in (df.drop(columns="patient_id"), df.assign(patient_id=[f"i{k}" for k in range(len(df))])):
        sc = audit_manifest(d)["shortcuts"]
        assert sc["cv_split"].startswith("StratifiedKFold over images")
        assert "source" in sc["flagged"]


def test_cv_groups_and_grouped_balanced_accuracy():
    pid = np.repeat([f"p{i}" for i in range(12)], 4)
    y = np.repeat(np.array(["covid", "normal"] * 6, dtype=object), 4)
    x = pid.astype(object)  # the patient itself
    assert audit._cv_balanced_accuracy(x, y, True) == 1.0
    assert audit._cv_balanced_accuracy(x, y, True, groups=pid) <= 0.5  # unseen patient: chance
    ids = pd.Series(list(pid[:-2]) + ["", None])
    groups, text = audit._cv_groups(ids, audit._patient_status(ids))
    assert text.startswith("StratifiedGroupKFold") and "2 image(s) without an id" in text
    assert len(set(groups[-2:])) == 2 and not set(groups[-2:]) & set(pid)
    for ids in (None, pd.Series([f"img:{k}" for k in range(5)]), pd.Series(["a", "b", "c"])):
        assert audit._cv_groups(ids, audit._patient_status(ids))[0] is None


def test_connected_groups_numbered_by_first_member():
    assert audit._connected_groups(7, [5, 1, 6], [4, 3, 1]) == [0, 1, 2, 1, 3, 3, 1]
    assert audit._connected_groups(3, [], []) == [0, 1, 2]
    assert audit._connected_groups(0, [], []) == []


def test_name_pattern_subgroup_is_flagged(tmp_path):
    # ct-mosmed's trap: part of one class comes from another source with its own naming.
    rows = []
    for k in range(40):
        rows.append(dict(path=save(tmp_path / "COVID" / f"img{k}.png", texture(k)), label="covid"))
    for k in range(20):
        rows.append(dict(path=save(tmp_path / "NonCOVID" / f"img{k}.png", texture(500 + k)), label="non_covid"))
    for k in range(25):
        rows.append(dict(path=save(tmp_path / "NonCOVID" / f"nor_{k // 8}_img_{k}.png", texture(900 + k)),
                         label="non_covid"))
    rep = audit_manifest(pd.DataFrame(rows))
    r = rep["shortcuts"]["properties"]["name_pattern"]
    assert r["shortcut"] and r["pure_subgroups"][0]["value"] == "nor_#_img_#"
    assert r["pure_subgroups"][0]["class"] == "non_covid"
    assert any("nor_#_img_#" in w for w in rep["warnings"])
    # No split / patient_id columns: still works, and says loudly that ids are missing.
    assert rep["splits"] == ["all"]
    assert rep["patient_ids"]["status"] == "missing"
    assert rep["warnings"][0].startswith("WARNING: NO REAL PATIENT IDS")


def test_name_pattern_ignores_label_words(tmp_path):
    assert audit._name_pattern("/d/covid/covid_p12_3.png", "covid") == "{label}_p#_#"
    assert audit._name_pattern("/d/Normal/normal_p7_1.png", "normal") == "{label}_p#_#"
    assert audit._name_pattern("/d/NonCOVID/nor_13_img_4.jpg", "non_covid") == "nor_#_img_#"


def test_placeholder_ids_unreadable_files_and_json(tmp_path):
    rows = []
    for k in range(6):
        label = "covid" if k % 2 else "normal"
        p = save(tmp_path / f"{k}.png", texture(k))
        rows.append(dict(path=p, label=label, patient_id=f"img:{k}", split="train"))
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    rows.append(dict(path=str(bad), label="covid", patient_id="img:broken", split="train"))
    rows.append(dict(path=str(tmp_path / "missing.png"), label="normal", patient_id="img:missing", split="train"))
    before = snapshot(tmp_path)
    rep = audit_manifest(pd.DataFrame(rows))
    assert snapshot(tmp_path) == before
    assert rep["patient_ids"]["status"] == "placeholder"
    assert "NO REAL PATIENT IDS" in rep["warnings"][0]
    assert rep["n_unreadable"] == 2
    reasons = {Path(u["path"]).name: u["reason"] for u in rep["unreadable"]}
    assert reasons["missing.png"] == "file not found"
    assert "decode" in reasons["broken.png"]

    out = write_audit(rep, tmp_path / "reports" / "audit.json")
    assert json.loads(out.read_text()) == rep
    assert [p.name for p in out.parent.iterdir()] == ["audit.json"]  # no temp file left
    text = format_audit(rep)
    assert "## Data audit" in text and "placeholder" in text and "broken.png" in text


def test_relative_paths_and_bad_input(tmp_path):
    save(tmp_path / "a.png", texture(1))
    save(tmp_path / "b.png", texture(2))
    rep = audit_manifest(pd.DataFrame({"path": ["a.png", "b.png"], "label": ["covid", "normal"]}), root=tmp_path)
    assert rep["n_readable"] == 2
    with pytest.raises(ValueError, match="label"):
        audit_manifest(pd.DataFrame({"path": ["a.png"]}))
    with pytest.raises(ValueError, match="empty"):
        audit_manifest(pd.DataFrame({"path": [], "label": []}))
    with pytest.raises(ValueError):
        audit_manifest([{"path": "a.png", "label": "covid"}])


def test_no_warning_holds_an_unformatted_placeholder(tmp_path):
    """Every warning sentence is fully formatted (a missing f-prefix once leaked '{...}')."""
    import cv2
    import numpy as np
    import pandas as pd

    from covidlib import audit

    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        img = (rng.random((64, 64)) * 255).astype("uint8")
        for split in ("train", "test"):  # the same image in two splits: exact + near duplicates
            p = tmp_path / f"{split}_{i}.png"
            cv2.imwrite(str(p), img)
            rows.append({"path": str(p), "label": "covid" if i % 2 else "normal",
                         "patient_id": f"p{i}{split}", "split": split, "source": "s", "modality": "ct"})
    report = audit.audit_manifest(pd.DataFrame(rows))
    assert any("LEAK" in w for w in report["warnings"])
    assert not any("{" in w or "}" in w for w in report["warnings"])
