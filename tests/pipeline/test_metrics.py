"""Metrics on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.metrics import LatencyStats, agreement, average_precision, top1_accuracy


def test_latency_percentiles():
    stats = LatencyStats.from_samples([float(i) for i in range(1, 101)])
    assert stats.n == 100 and stats.p50 == pytest.approx(50.5) and stats.p90 == pytest.approx(90.1)
    assert stats.mean == pytest.approx(50.5) and stats.throughput_per_s == pytest.approx(1000 / 50.5)


def test_top1():
    outputs = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert top1_accuracy(outputs, np.array([1, 0, 0])) == pytest.approx(2 / 3)


def test_ap_perfect_and_with_a_false_positive():
    truth = [np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float)]
    perfect = [np.array([[0, 0, 10, 10, 0.9], [20, 20, 30, 30, 0.8]])]
    assert average_precision(perfect, truth) == pytest.approx(1.0)
    # A higher-scored false positive first: precision 0, 1/2, 2/3 at recalls 0, 0.5, 1 -> AP = 0.5*2/3 + 0.5*2/3
    with_fp = [np.array([[50, 50, 60, 60, 0.95], [0, 0, 10, 10, 0.9], [20, 20, 30, 30, 0.8]])]
    assert average_precision(with_fp, truth) == pytest.approx(2 / 3)
    # A missed box halves recall.
    assert average_precision([perfect[0][:1]], truth) == pytest.approx(0.5)


def test_agreement():
    ref = np.array([[1.0, 0.0], [0.0, 1.0]])
    got = np.array([[0.9, 0.1], [0.6, 0.4]])
    result = agreement(got, ref, classifier=True)
    assert result.top1 == 0.5 and result.max_abs == pytest.approx(0.6) and result.samples == 2


def test_each_kind_of_task_brings_its_scoring():
    """The one place that looks at a workload's kind (pipeline.scoring): its metric, and what agreement means."""
    from pipeline.data import PreparedData
    from pipeline.workloads.base import Samples

    outputs = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]], np.float32)
    labelled = Samples({"x": np.zeros((3, 1), np.float32)}, np.array([1, 0, 0]))
    unlabelled = Samples({"x": np.zeros((3, 1), np.float32)})

    def data(kind):
        return PreparedData(workload=None, kind=kind, calibration_path=None, calibration_samples=0,
                            calibration_source="", eval_path="e.npz", eval_samples=3, eval_source="", has_labels=True)

    classifier, detector, unknown = (data(kind).scoring for kind in ("classifier", "detector", None))
    assert classifier.metric_for(labelled) == "top1" and classifier.metric_for(unlabelled) is None
    assert classifier.accuracy(outputs, labelled) == pytest.approx(2 / 3)
    assert classifier.accuracy(outputs, unlabelled) is None
    assert classifier.agreement(outputs, outputs).top1 == 1.0
    assert detector.metric_for(labelled) == "mAP@0.5" and detector.agreement(outputs, outputs).top1 is None
    assert unknown.metric_for(labelled) is None and unknown.accuracy(outputs, labelled) is None
    assert unknown.agreement(outputs, outputs[:, ::-1]).top1 == 0.0  # every argmax differs
