"""``imgserve eval``: COCO mAP (pycocotools) of a detector, or per-class IoU and mIoU of a segmenter, on held-out data.

    imgserve eval --model-repository model_repository --model centernet_scenes --data data/scenes --split test
    imgserve eval --model-repository model_repository --model unet_scenes --data data/scenes --json unet.json

The data is the scenes layout (``imgserve make-dataset scenes``), the formats a user has:
``DATA/annotations/instances_SPLIT.json`` (COCO) for detectors, ``DATA/SPLIT/SegmentationClass``
(VOC palette masks) with ``DATA/labels.txt`` for segmenters, images in ``DATA/SPLIT/images``.

    imgserve eval --url localhost:8500 --model centernet_scenes --data data/scenes --tta

The command sends encoded image files to a predictor and scores what comes back in ORIGINAL image
pixels. With ``--model-repository`` the predictor runs the repository's model.onnx with onnxruntime
and the gateway's letterbox (export/evaluation/predictors.py); with ``--url`` the images go through a
running gateway (export/evaluation/gateway.py), either backend, optionally with its test-time
augmentation. No torch is imported.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from export.evaluation.predictors import DetectionPredictor, SegmentationPredictor, repository_predictor
from export.evaluation.scoring import DetectionScores, Detections, SegmentationScores, score_detections, score_masks

SPLIT_LAYOUT = {"images": "{split}/images", "masks": "{split}/SegmentationClass",
                "annotations": "annotations/instances_{split}.json", "labels": "labels.txt"}
CHUNK = 32


class EvalError(RuntimeError):
    """The model, the data or the options cannot be evaluated together."""


def _path(args: argparse.Namespace, key: str) -> Path:
    return Path(args.data) / SPLIT_LAYOUT[key].format(split=args.split)


def gateway_predictor(args: argparse.Namespace) -> tuple[str, list[str], DetectionPredictor | SegmentationPredictor, str]:
    """The predictor through a running gateway (``--url``): the model's task and labels come from ListModels."""
    from clients.sdk import ImageClient, ImgserveError
    from export.evaluation.gateway import GatewayDetector, GatewaySegmenter

    client = ImageClient(args.url, timeout=args.timeout)
    try:
        info = client.model(args.model)
    except ImgserveError as exc:
        client.close()
        raise EvalError(f"{args.url}: {exc.code}: {exc.message}") from None
    tta = True if args.tta else None
    if info.task == "detection":
        predictor: DetectionPredictor | SegmentationPredictor = GatewayDetector(client, args.model, tta=tta)
    elif info.task == "segmentation":
        predictor = GatewaySegmenter(client, args.model, tta=tta)
    else:
        client.close()
        raise EvalError(f"model {args.model!r} is a {info.task} model; eval scores detectors and segmenters")
    return info.task, list(info.labels), predictor, f"{info.name} v{info.version} (gateway {args.url}" + \
        (", tta)" if args.tta else ")")


def make_predictor(args: argparse.Namespace) -> tuple[str, list[str], DetectionPredictor | SegmentationPredictor, str]:
    """(task, labels, predictor, a description of what runs it) from the options."""
    if args.url is not None:
        return gateway_predictor(args)
    if args.tta:
        raise EvalError("--tta needs --url: test-time augmentation is the gateway's")
    if args.model_repository is None:
        raise EvalError("give --model-repository (the model's repository directory) or --url (a running gateway)")
    model_dir = Path(args.model_repository) / args.model
    if not model_dir.is_dir():
        raise EvalError(f"no model {args.model!r} in {args.model_repository}")
    try:
        spec, predictor = repository_predictor(model_dir, threads=args.threads)
    except ValueError as exc:
        raise EvalError(str(exc)) from None
    return spec.task, list(spec.labels), predictor, f"{spec.name} v{spec.version} (onnxruntime, {model_dir})"


def _chunks(items: Sequence[Any], size: int = CHUNK) -> list[Sequence[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def evaluate_detector(predictor: DetectionPredictor, annotations: Path, images_dir: Path, labels: Sequence[str],
                      limit: int | None = None) -> DetectionScores:
    """Run ``predictor`` over the COCO file's images (original files, as bytes) and score with pycocotools."""
    coco = json.loads(annotations.read_text())
    names = [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])]
    if list(names) != list(labels):
        raise EvalError(f"the model's classes {list(labels)} differ from the data's categories {names}")
    images = sorted(coco["images"], key=lambda im: im["id"])[:limit]
    detections: list[Detections] = []
    for chunk in _chunks(images):
        detections += predictor.predict([(images_dir / im["file_name"]).read_bytes() for im in chunk])
    return score_detections(coco, [im["id"] for im in images], detections)


def evaluate_segmenter(predictor: SegmentationPredictor, images_dir: Path, masks_dir: Path, labels: Sequence[str],
                       data_labels: Sequence[str] | None = None, limit: int | None = None) -> SegmentationScores:
    """Run ``predictor`` over every image with a mask and score the masks at the original size."""
    from export.data.voc import VocSegmentation, load_mask

    if data_labels is not None and list(data_labels) != list(labels):
        raise EvalError(f"the model's classes {list(labels)} differ from the data's {list(data_labels)}")
    data = VocSegmentation(images_dir, masks_dir)
    count = len(data) if limit is None else min(limit, len(data))
    predicted: list[np.ndarray] = []
    for chunk in _chunks(list(range(count))):
        predicted += predictor.predict([data.image_paths[i].read_bytes() for i in chunk])
    truth = [load_mask(masks_dir / f"{data.ids[i]}.png") for i in range(count)]
    return score_masks(predicted, truth, labels)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="imgserve eval", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    parser.add_argument("--model", required=True, help="model name")
    parser.add_argument("--model-repository", type=Path, default=None, help="repository holding the model")
    parser.add_argument("--url", default=None,
                        help="score through a running gateway instead (host:port for gRPC, http://host:port for HTTP)")
    parser.add_argument("--tta", action="store_true", help="with --url: ask for flip test-time augmentation")
    parser.add_argument("--timeout", type=float, default=60.0, help="with --url: seconds per request (default 60)")
    parser.add_argument("--data", type=Path, required=True, help="dataset root in the scenes layout")
    parser.add_argument("--split", default="test", help="split to score (default test, the held-out one)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N images")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads (default 1)")
    parser.add_argument("--json", type=Path, default=None, help="also write the scores to this JSON file")
    args = parser.parse_args(list(argv))
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    return args


def run(args: argparse.Namespace) -> tuple[DetectionScores | SegmentationScores, dict[str, Any]]:
    task, labels, predictor, source = make_predictor(args)
    start = time.perf_counter()
    scores: DetectionScores | SegmentationScores
    if task == "detection":
        scores = evaluate_detector(predictor, _path(args, "annotations"), _path(args, "images"), labels, args.limit)  # type: ignore[arg-type]
    else:
        label_file = _path(args, "labels")
        data_labels = [x.strip() for x in label_file.read_text().splitlines() if x.strip()] if label_file.is_file() else None
        scores = evaluate_segmenter(predictor, _path(args, "images"), _path(args, "masks"), labels, data_labels,  # type: ignore[arg-type]
                                    args.limit)
    report = {"model": args.model, "source": source, "task": task, "data": str(args.data), "split": args.split,
              "seconds": time.perf_counter() - start, **scores.to_dict()}
    return scores, report


def format_report(scores: DetectionScores | SegmentationScores, report: dict[str, Any]) -> str:
    head = f"{report['source']} on {scores.images} {report['split']} images of {report['data']}"
    if isinstance(scores, DetectionScores):
        lines = [head, f"  COCO mAP@[.5:.95] {scores.map:.4f}   mAP@0.5 {scores.map50:.4f}   mAP@0.75 {scores.map75:.4f}"
                       f"   ({scores.detections} detections, pycocotools)", "  class       AP@[.5:.95]"]
        lines += [f"  {name:<11} {ap:.4f}" for name, ap in scores.per_class.items()]
    else:
        lines = [head, f"  mIoU {scores.miou:.4f}   mIoU without background {scores.miou_foreground:.4f}"
                       f"   pixel accuracy {scores.pixel_accuracy:.4f}", "  class       IoU"]
        lines += [f"  {name:<11} {iou:.4f}" for name, iou in scores.per_class.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        scores, report = run(args)
    except (EvalError, FileNotFoundError, ValueError) as exc:
        print(f"imgserve eval: {exc}", file=sys.stderr)
        return 2
    print(format_report(scores, report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
