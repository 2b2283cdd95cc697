"""Weight-update masks for masked zeroth-order training (MaZO; docs/mazo.md).

Pure functions, in the order they are used:

* :mod:`zolm.masks.calibrate`  per-task gradient statistics from a few backward passes (first-order probes);
* :mod:`zolm.masks.importance` statistics -> per-task weight-importance score -> row-normalised score;
* :mod:`zolm.masks.multitask`  scores of all tasks -> one mask with exactly k ones per row; random and
  magnitude masks of the same ratio; overlap statistics; save / load;
* :mod:`zolm.masks.variance`   how far a (masked) one-query SPSA estimate is from the true gradient.
"""
