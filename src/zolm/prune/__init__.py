"""Pruning: magnitude, Wanda, SparseGPT and Wanda++ on the linear layers of decoder blocks.

``prune_(model, PruneConfig(method="wanda++", nm="2:4"), calib_ids)`` prunes in place and returns a report.
"""

from zolm.prune.api import METHODS, PruneConfig, PruneReport, prune_
