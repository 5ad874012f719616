"""Continual-learning scores of an accuracy matrix, as an `evaluate` metric.

Load it with `evaluate.load(path_to_this_folder)` (offline) or from the Hub once published. The maths is
`pgp_peft.metrics` (one implementation); this module adapts it to `evaluate`'s interface. Every import
sits on its own line: evaluate's dependency scanner reads one library per `import` line.
"""

import datasets
import evaluate
import numpy as np

from pgp_peft.metrics import summarize

_CITATION = """\
@inproceedings{qiao2024pgp,
  title={Prompt Gradient Projection for Continual Learning},
  author={Qiao, Jingyang and Zhang, Zhizhong and Tan, Xin and Chen, Chengwei and Qu, Yanyun and Peng, Yong and Xie, Yuan},
  booktitle={International Conference on Learning Representations},
  year={2024}
}
"""

_DESCRIPTION = """\
Scores a continual-learning run from its accuracy matrix A, where A[i][t] is the accuracy (percent)
on task i's test set after training task t (None or NaN where not measured, always for i > t):
average accuracy, forgetting (paper and reference-code definitions), backward transfer and average
incremental accuracy, after the last task that has any value (or `after_task`).
"""

_KWARGS_DESCRIPTION = """
Args:
    accuracy_matrix (`list` of `list` of `float`): one row per evaluated task i, A[i][0..T-1]; None or NaN
        where not measured. T rows in total (a square matrix).
    after_task (`int`, optional): score after this task (0-based). Default: the last column with a value.
Returns:
    average_accuracy (`float`): mean of A[i][t] over the seen tasks i <= t.
    forgetting_paper (`float`): mean over i < t of max_{j in [i, t-1]} A[i][j] - A[i][t] (can be negative).
    forgetting_reference (`float`): as above with the max over j in [i, t] (the authors' code; >= 0).
    backward_transfer (`float`): mean over i < t of A[i][t] - A[i][i].
    average_incremental_accuracy (`float`): mean of the average accuracy after each task so far.
    average_accuracy_per_task (`list`): the average accuracy after each task (None if not fully measured).
    final_accuracies (`list`): A[0..t][t].
    num_tasks, tasks_completed (`int`), accuracy_matrix (`list`): the matrix as scored (NaN -> None).
    With one task seen, forgetting and backward transfer are 0.0.
Examples:
    >>> metric = evaluate.load("path/to/continual_learning")
    >>> scores = metric.compute(accuracy_matrix=[[90.0, 80.0], [None, 70.0]])
    >>> scores["average_accuracy"], scores["forgetting_paper"]
    (75.0, 10.0)
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ContinualLearning(evaluate.Metric):
    """Average accuracy, both forgetting definitions, BWT and average incremental accuracy of A (T, T)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"accuracy_matrix": datasets.Sequence(datasets.Value("float64"))}),
            reference_urls=["https://openreview.net/forum?id=EH2O3h7sBI"],
        )

    def _compute(self, accuracy_matrix, after_task=None):
        rows = [[np.nan if value is None else float(value) for value in row] for row in accuracy_matrix]
        widths = sorted({len(row) for row in rows})
        if widths != [len(rows)]:
            raise ValueError(
                f"accuracy_matrix must be square (T rows of T values): got {len(rows)} rows of lengths {widths}"
            )
        return summarize(np.array(rows, dtype=np.float64), after_task)
