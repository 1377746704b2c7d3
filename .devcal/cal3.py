"""GPU calibration driver #3 (temporary; TRAIN helper)."""
import json, os, sys, time
from pathlib import Path
import torch
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
OUT = Path(os.environ["OUT"]); D = Path("/tmp/cal")
from export.data import shapes
import export.data.make_dataset as md
from export.train import parse_args, train
def log(rec):
    print(json.dumps(rec), flush=True)
    with open(OUT / "cal3.jsonl", "a") as f: f.write(json.dumps(rec) + "\n")
S = shapes.ShapesStyle
styles = {"V1": S(rotation=20.0), "V2": S(rotation=20.0, texture=0.3, clutter_behind=(0, 3), radius=(0.28, 0.4)),
          "V3": S(texture=0.3, clutter_behind=(0, 2), clutter_front=(0, 0), radius=(0.28, 0.4))}
for name, st in styles.items():
    md.ShapesConfig = lambda st=st, **kw: shapes.ShapesConfig(style=st, **kw)
    md.make_shapes(D / name, train_per_class=300, val_per_class=60, size=64, workers=15, overwrite=True, progress=False)
    sub = D / f"{name}_200"
    for split, k in (("train", 200), ("val", 60)):
        for cdir in sorted((D / name / split).iterdir()):
            dst = sub / split / cdir.name; dst.mkdir(parents=True, exist_ok=True)
            for f in sorted(cdir.iterdir())[:k]: os.symlink(f, dst / f.name)
runs = [("V1_200", "resnet18", 72, 64, 2), ("V2_200", "resnet18", 72, 64, 2), ("V3_200", "resnet18", 72, 64, 2), ("V1", "resnet18", 72, 64, 2),
        ("V2", "resnet18", 72, 64, 3), ("V1", "cifar_resnet20", 36, 32, 4), ("V3", "cifar_resnet20", 36, 32, 4), ("V1", "resnet18", 36, 32, 3)]
for data, model, Sz, C, ep in runs:
    t = time.time(); out = D / "runs" / f"{data}-{model}-{Sz}-{ep}"
    r = train(parse_args(["--data", str(D / data), "--model", model, "--resize", str(Sz), "--crop", str(C), "--epochs", str(ep),
                          "--batch-size", "32", "--lr", "0.05", "--warmup-epochs", "0.3", "--device", "cuda", "--no-amp",
                          "--no-channels-last", "--workers", "10", "--no-progress", "--output", str(out), "--overwrite"]))
    f = r.final; m = json.loads((out / "metrics.json").read_text())
    log({"data": data, "model": model, "S": Sz, "ep": ep, "val": [round(e["val_acc"], 3) for e in m["epochs"]],
         "train_acc": round(m["epochs"][-1]["train_acc"], 3), "center": f.center_acc, "ten": f.ten_crop_acc,
         "per_class": [round(v, 2) for v in f.center_per_class], "secs": round(time.time() - t, 1)})
