"""GPU calibration driver (temporary; TRAIN helper)."""
import json, os, sys, time
from pathlib import Path
import torch
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
OUT = Path(os.environ["OUT"]); D = Path("/tmp/cal")
from export.data.make_dataset import make_shapes
from export.train import parse_args, train

def log(rec):
    print(json.dumps(rec), flush=True)
    with open(OUT / "cal.jsonl", "a") as f: f.write(json.dumps(rec) + "\n")

t = time.time()
make_shapes(D / "s64", train_per_class=300, val_per_class=100, size=64, workers=14, overwrite=True, progress=False)
make_shapes(D / "s40", train_per_class=300, val_per_class=100, size=40, workers=14, overwrite=True, progress=False)
log({"gen_seconds": time.time() - t})
for base in ("s64", "s40"):
    for n in (100, 200) if sys.argv[1] == "sweep" else ():
        sub = D / f"{base}_{n}"
        for split, k in (("train", n), ("val", 100)):
            for cdir in sorted((D / base / split).iterdir()):
                dst = sub / split / cdir.name; dst.mkdir(parents=True, exist_ok=True)
                for f in sorted(cdir.iterdir())[:k]: os.symlink(f, dst / f.name)

mode = sys.argv[1]
if mode == "sweep":
    runs = [("s64", "resnet18", 72, 64, 6, 0.1), ("s64", "resnet18", 72, 64, 4, 0.1), ("s64_200", "resnet18", 72, 64, 5, 0.1),
            ("s64_100", "resnet18", 72, 64, 8, 0.1), ("s64_200", "resnet18", 72, 64, 3, 0.1), ("s40", "resnet18", 36, 32, 6, 0.1),
            ("s40_200", "resnet18", 36, 32, 5, 0.1), ("s40", "cifar_resnet20", 36, 32, 6, 0.1), ("s64", "resnet18", 72, 64, 12, 0.1),
            ("s64_200", "resnet18", 72, 64, 5, 0.05), ("s64_100", "cifar_resnet20", 36, 32, 8, 0.1)]
    for data, model, S, C, ep, lr in runs:
        t = time.time()
        r = train(parse_args(["--data", str(D / data), "--model", model, "--resize", str(S), "--crop", str(C), "--epochs", str(ep),
                              "--lr", str(lr), "--warmup-epochs", "0.5", "--device", "cuda", "--no-amp", "--no-channels-last",
                              "--workers", "8", "--no-progress", "--output", str(D / "runs" / f"{data}-{model}-{S}-{ep}-{lr}"), "--overwrite"]))
        f = r.final
        log({"data": data, "model": model, "S": S, "C": C, "epochs": ep, "lr": lr, "best": r.best_val_acc, "center": f.center_acc,
             "ten": f.ten_crop_acc, "nll": f.center_nll, "nll10": f.ten_crop_nll, "secs": round(time.time() - t, 1)})
    # CUDA AMP + channels_last + resume smoke
    out = D / "runs" / "amp"
    base = ["--data", str(D / "s64_100"), "--model", "resnet18", "--resize", "72", "--crop", "64", "--device", "cuda", "--workers", "8",
            "--no-progress", "--output", str(out)]
    r1 = train(parse_args(base + ["--epochs", "2", "--overwrite"]))
    r2 = train(parse_args(["--resume", str(out / "last.pt"), "--epochs", "3", "--no-progress"]))
    m = json.loads((out / "metrics.json").read_text())
    log({"amp_smoke": True, "summary_amp": m["summary"]["amp"], "cl": m["summary"]["channels_last"], "epochs": [e["epoch"] for e in m["epochs"]],
         "acc": r2.final.center_acc, "ten": r2.final.ten_crop_acc})
else:
    from export.experiments.init_depth import run_init_experiment
    from export.experiments.residual_depth import run_residual_experiment
    for arch, lr, width in (("mlp", 0.01, 256), ("mlp", 0.03, 256), ("mlp", 0.1, 256), ("conv", 0.01, 16), ("conv", 0.03, 16), ("conv", 0.1, 16)):
        try:
            r = run_init_experiment(arch=arch, width=width, lr=lr, epochs=8, device="cuda")
            log({"init": arch, "lr": lr, "he": r.runs["kaiming"].epoch_loss, "lecun": r.runs["lecun"].epoch_loss[-1],
                 "he_acc": r.runs["kaiming"].val_acc, "decay": r.std_decay, "claims": [r.he_learns, r.small_init_stalls]})
        except FloatingPointError as e:
            log({"init": arch, "lr": lr, "error": str(e)})
    for arch, lr, n, ep in (("mlp", 0.03, 40, 3), ("mlp", 0.1, 40, 3), ("conv", 0.03, 40, 3)):
        try:
            r = run_init_experiment(arch=arch, depth=30, width=64 if arch == "mlp" else 8, res=12, train_per_class=n, val_per_class=10, lr=lr, epochs=ep, device="cuda")
            log({"init_tiny": arch, "lr": lr, "he": r.runs["kaiming"].epoch_loss, "lecun": r.runs["lecun"].epoch_loss[-1], "claims": [r.he_learns, r.small_init_stalls]})
        except FloatingPointError as e:
            log({"init_tiny": arch, "lr": lr, "error": str(e)})
    for depths, width, res, n, ep in (((20, 56), 8, 24, 200, 6), ((20, 56), 16, 24, 200, 6), ((8, 32), 8, 16, 60, 3), ((8, 26), 8, 16, 60, 3), ((8, 32), 4, 16, 50, 2)):
        r = run_residual_experiment(depths=depths, width=width, res=res, train_per_class=n, val_per_class=20, epochs=ep, device="cuda")
        log({"res": depths, "width": width, "res_px": res, "n": n, "ep": ep,
             **{k: (round(v.train_loss[-1], 4), round(v.val_acc, 3)) for k, v in r.runs.items()},
             "claims": [r.deep_residual_beats_plain, r.plain_degrades]})
