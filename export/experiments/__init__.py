"""Small, reproducible experiments that check the claims our training recipe rests on.

Each module has a ``run_*`` function (used by tests in a tiny configuration)
and a ``main(argv)`` that writes JSON results and PNG plots, by default into
docs/experiments/:

* ``init_depth``: He init (Var[w] = 2/n) trains a 30-layer plain ReLU net, Var[w] = 1/n does not.
* ``residual_depth``: deeper plain nets train worse than the same depth with shortcuts.
* ``ten_crop``: 10-crop averaging is at least as accurate as the centre crop.

``python -m export.experiments.run_all`` runs all three at their documented size.
"""
