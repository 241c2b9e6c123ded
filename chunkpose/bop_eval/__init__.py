"""BOP19 evaluation without bop_toolkit: VSD, MSSD, MSPD average recall and ADD(-S) AUC.

    from chunkpose.bop_eval import evaluate, format_table, plot
    result = evaluate("datasets/ycbv", "out/chunkpose_ycbv-test.csv")
    print(format_table(result)); plot(result, "out/recall.png")

Modules: errors (the pose errors), matching (targets, top-N, greedy matching), scores
(recall, average recall), image_errors (the errors of one image's estimates), summary
(recalls and curves of all entries), protocol (`evaluate`: the whole protocol; not named
after the function, so that importing the module never hides the function), report
(table and plot).
"""
from chunkpose._lazy import lazy_getattr

_EXPORTS = {
    "evaluate": "chunkpose.bop_eval.protocol",
    "EvaluationError": "chunkpose.bop_eval.protocol",
    "format_table": "chunkpose.bop_eval.report",
    "plot": "chunkpose.bop_eval.report",
    "mssd": "chunkpose.bop_eval.errors",
    "mspd": "chunkpose.bop_eval.errors",
    "vsd_from_depths": "chunkpose.bop_eval.errors",
    "eval_symmetries": "chunkpose.bop_eval.errors",
    "greedy_match": "chunkpose.bop_eval.matching",
    "valid_gt": "chunkpose.bop_eval.matching",
    "ObjectErrors": "chunkpose.bop_eval.scores",
    "average_recall": "chunkpose.bop_eval.scores",
    "recall": "chunkpose.bop_eval.scores",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr("chunkpose.bop_eval", _EXPORTS, globals())
