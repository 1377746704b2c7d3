"""Training recipes for the dense tasks, siblings of the classifier's export/train.py (torchvision
``references/detection`` and ``references/segmentation`` style): ``common`` holds the options and
the loop they share, ``detection`` and ``segmentation`` what differs (data, targets, loss, scoring)."""
