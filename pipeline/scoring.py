"""How outputs are scored, by the kind of task the model does (a workload's `kind`, or a classifier when the user's
data has integer labels): its metric against the labels, and what agreement with the fp32 reference means. The one
place that looks at the kind; the stages ask the data for its scoring (`PreparedData.scoring`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.metrics import Agreement, agreement, average_precision, top1_accuracy
from pipeline.workloads.base import Samples, TaskKind
from pipeline.workloads.detector import decode


def _top1(outputs: np.ndarray, labels: Any) -> float:
    return top1_accuracy(outputs, np.asarray(labels))


def _mean_average_precision(outputs: np.ndarray, labels: Any) -> float:
    return average_precision([decode(o) for o in outputs], list(labels)[: len(outputs)])


def _coco(outputs: np.ndarray, labels: Any) -> dict[str, float]:
    from pipeline.coco import coco_map  # pycocotools, only for a user's COCO annotations

    return coco_map(outputs, labels)


@dataclass(frozen=True)
class Scoring:
    metric: str | None  # its name in results (None: nothing to score against)
    metric_words: str  # the metric in a sentence
    argmax_means_something: bool  # top-1 agreement with fp32 is meaningful (class scores), else cosine only
    _accuracy: Callable[[np.ndarray, Any], float] | None = None
    _metrics: Callable[[np.ndarray, Any], dict[str, float]] | None = None  # several at once (the headline among them)

    def metric_for(self, samples: Samples) -> str | None:
        """The metric these samples are scored by: None without labels."""
        return self.metric if samples.labels is not None else None

    def metrics(self, outputs: np.ndarray, samples: Samples) -> dict[str, float]:
        """Every metric of ``outputs`` against the samples' labels, the headline first; empty without labels."""
        if samples.labels is None or self.metric is None:
            return {}
        if self._metrics is not None:
            return self._metrics(outputs, samples.labels)
        return {self.metric: self._accuracy(outputs, samples.labels)} if self._accuracy else {}

    def accuracy(self, outputs: np.ndarray, samples: Samples) -> float | None:
        """The headline metric of ``outputs`` against the samples' labels; None without labels."""
        return self.metrics(outputs, samples).get(self.metric or "")

    def agreement(self, outputs: np.ndarray, reference: np.ndarray) -> Agreement:
        """How close ``outputs`` are to the fp32 reference's."""
        return agreement(outputs, reference, classifier=self.argmax_means_something)

    def agreement_words(self) -> str:
        return "top-1 agreement with fp32" if self.argmax_means_something else "cosine with fp32"


CLASSIFIER = Scoring(metric="top1", metric_words="top-1", argmax_means_something=True, _accuracy=_top1)
DETECTOR = Scoring(metric="mAP@0.5", metric_words="mAP@0.5", argmax_means_something=False,
                   _accuracy=_mean_average_precision)
# A detector of the user's with COCO annotations: COCO's own metric, by pycocotools (pipeline/coco.py).
COCO_DETECTOR = Scoring(metric="mAP@0.5:0.95", metric_words="COCO mAP@0.5:0.95", argmax_means_something=False,
                        _metrics=_coco)
# A model of the user's without labelled data: no metric, agreement with fp32 by the outputs' argmax and cosine.
UNLABELLED = Scoring(metric=None, metric_words="agreement with fp32", argmax_means_something=True)

_BY_KIND: dict[TaskKind | None, Scoring] = {"classifier": CLASSIFIER, "detector": DETECTOR, "coco": COCO_DETECTOR,
                                             None: UNLABELLED}


def scoring_for(kind: TaskKind | None) -> Scoring:
    return _BY_KIND[kind]
