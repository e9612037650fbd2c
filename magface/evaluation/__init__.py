"""Evaluation: verification metrics, IJB templates and scores, quality ERC/EDC, clustering, plots.

Each metric is one function here; the CLI, MLflow logging and the tests all call the same one.
Names load lazily: a Ray worker that needs one metric does not pay for sklearn, matplotlib and torch.
"""

import importlib

_EXPORTS = {
    "clustering": ["bcubed", "cluster_features", "cluster_report", "magnitude_vs_center", "nmi"],
    "metrics": ["DEFAULT_FARS", "check_pairs", "roc_points", "tar_at_far"],
    "plots": ["edc_figure", "erc_figure", "magnitude_center_figure", "magnitude_histogram", "roc_figure"],
    "quality": ["edc_curve", "edc_pauc", "edc_report", "error_versus_reject", "threshold_at_fmr"],
    "templates": ["UnknownTemplateError", "aggregate_templates", "score_pairs", "template_rows"],
    "verification": ["verification_accuracy"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'magface.evaluation' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"magface.evaluation.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
