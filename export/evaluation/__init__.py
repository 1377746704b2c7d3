"""``imgserve eval``: score a detector or segmenter on held-out data (COCO mAP through pycocotools, mIoU).

Nothing here imports torch: the scoring and the repository predictors run in a serve-only install.
"""
