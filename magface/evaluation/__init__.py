"""Evaluation: verification metrics, IJB templates and scores, quality ERC, clustering, plots.

Each metric is one function here; the CLI, MLflow logging and the tests all call the same one.
"""

from magface.evaluation.clustering import bcubed, cluster_features, cluster_report, magnitude_vs_center, nmi
from magface.evaluation.metrics import DEFAULT_FARS, check_pairs, roc_points, tar_at_far
from magface.evaluation.plots import erc_figure, magnitude_center_figure, magnitude_histogram, roc_figure
from magface.evaluation.quality import error_versus_reject, threshold_at_fmr
from magface.evaluation.templates import UnknownTemplateError, aggregate_templates, score_pairs, template_rows
from magface.evaluation.verification import verification_accuracy

__all__ = [
    "DEFAULT_FARS",
    "UnknownTemplateError",
    "aggregate_templates",
    "bcubed",
    "check_pairs",
    "cluster_features",
    "cluster_report",
    "erc_figure",
    "error_versus_reject",
    "magnitude_center_figure",
    "magnitude_histogram",
    "magnitude_vs_center",
    "nmi",
    "roc_figure",
    "roc_points",
    "score_pairs",
    "tar_at_far",
    "template_rows",
    "threshold_at_fmr",
    "verification_accuracy",
]
