"""GPU calibration driver #2 (temporary; TRAIN helper)."""
import json, os, sys, time
from pathlib import Path
import torch
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
OUT = Path(os.environ["OUT"]); D = Path("/tmp/cal")
from export.data import shapes
from export.data.make_dataset import make_shapes
from export.train import parse_args, train

def log(rec):
    print(json.dumps(rec), flush=True)
    with open(OUT / "cal2.jsonl", "a") as f: f.write(json.dumps(rec) + "\n")

HARD = shapes.ShapesStyle(texture=0.8, noise=(5.0, 25.0), radius=(0.2, 0.34), min_contrast=55.0, clutter_behind=(2, 6), clutter_front=(0, 2))
t = time.time()
make_shapes(D / "A", train_per_class=300, val_per_class=100, size=64, workers=14, overwrite=True, progress=False)
# regenerate with the hard style by patching the default used in make_shapes
import export.data.make_dataset as md
md.ShapesConfig = lambda **kw: shapes.ShapesConfig(style=HARD, **kw)
make_shapes(D / "B", train_per_class=300, val_per_class=100, size=64, workers=14, overwrite=True, progress=False)
md.ShapesConfig = shapes.ShapesConfig
log({"gen_seconds": time.time() - t})
for n in (100, 200):
    sub = D / f"A_{n}"
    for split, k in (("train", n), ("val", 100)):
        for cdir in sorted((D / "A" / split).iterdir()):
            dst = sub / split / cdir.name; dst.mkdir(parents=True, exist_ok=True)
            for f in sorted(cdir.iterdir())[:k]: os.symlink(f, dst / f.name)

runs = [("A_200", 2, 32, 0.05), ("A_200", 3, 32, 0.05), ("A", 3, 64, 0.1), ("A", 4, 32, 0.05), ("A_100", 5, 32, 0.05),
        ("A", 3, 32, 0.1), ("A", 6, 64, 0.1), ("B", 6, 64, 0.1), ("A_200", 4, 32, 0.05)]
for data, ep, bs, lr in runs:
    t = time.time(); out = D / "runs" / f"{data}-{ep}-{bs}-{lr}"
    r = train(parse_args(["--data", str(D / data), "--model", "resnet18", "--resize", "72", "--crop", "64", "--epochs", str(ep),
                          "--batch-size", str(bs), "--lr", str(lr), "--warmup-epochs", "0.3", "--device", "cuda", "--no-amp",
                          "--no-channels-last", "--workers", "8", "--no-progress", "--output", str(out), "--overwrite"]))
    f = r.final; m = json.loads((out / "metrics.json").read_text())
    log({"data": data, "epochs": ep, "bs": bs, "lr": lr, "val_by_epoch": [round(e["val_acc"], 3) for e in m["epochs"]],
         "train_acc": round(m["epochs"][-1]["train_acc"], 3), "center": f.center_acc, "ten": f.ten_crop_acc,
         "nll": round(f.center_nll, 4), "nll10": round(f.ten_crop_nll, 4), "per_class": [round(v, 2) for v in f.center_per_class],
         "classes": r.classes, "secs": round(time.time() - t, 1)})

from export.experiments.residual_depth import run_residual_experiment
for depths, width, res, n, ep, lr in (((20, 56), 8, 24, 200, 6, 0.1), ((20, 56), 8, 24, 200, 6, 0.05), ((20, 56), 16, 32, 200, 6, 0.1),
                                      ((8, 32), 8, 16, 60, 3, 0.1), ((8, 32), 8, 16, 100, 3, 0.05), ((14, 44), 8, 16, 100, 4, 0.1)):
    t = time.time()
    r = run_residual_experiment(depths=depths, width=width, res=res, train_per_class=n, val_per_class=20, epochs=ep, lr=lr, device="cuda")
    log({"res": depths, "width": width, "px": res, "n": n, "ep": ep, "lr": lr,
         **{k: ([round(x, 3) for x in v.train_loss], round(v.val_acc, 3)) for k, v in r.runs.items()},
         "claims": [r.deep_residual_beats_plain, r.plain_degrades], "secs": round(time.time() - t, 1)})
