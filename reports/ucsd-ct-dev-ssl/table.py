"""Usage: python table.py WORK VARIANT...  UCSD experiment table: test (= official UCSD val) macro AUC [95% patient CI], TTA, external MosMed."""
import json, sys
rows = []
work = sys.argv[1]
for name in sys.argv[2:]:
    e = json.load(open(f"{work}/{name}/evaluation.json"))
    ext = e.get("external_validation") or {}
    tta = e.get("tta") or {}
    for m in list(e["models"]) + ["vote"]:
        blk = e["ensemble"] if m == "vote" else e["models"][m]
        t = (tta.get("ensemble") if m == "vote" else tta.get("models", {}).get(m)) or {}
        x = ext.get("models", {}).get(m) or {}
        f = lambda b: (f"{b['auc_macro']:.3f} [{b['ci95']['auc_macro'][0]:.3f}, {b['ci95']['auc_macro'][1]:.3f}]"
                       if b and b.get("auc_macro") is not None and b.get("ci95", {}).get("auc_macro") else "-")
        rows.append(f"| {name} | {m} | {f(blk)} | {f(t)} | {f(x)} |")
print("| variant | model | UCSD val macro AUC [95% CI, patients] | + TTA (8 views) | external MosMed macro AUC [95% CI, images] |")
print("|---|---|---|---|---|")
print("\n".join(rows))
