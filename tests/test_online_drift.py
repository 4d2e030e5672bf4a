"""Drift monitor: known answers from river's docs, calibrated false-alarm rates, detection delay and direction,
restarts, and replay equivalence. Streams are seeded Bernoulli / Beta score streams in [0, 1]."""
from __future__ import annotations

import random

import numpy as np
import pytest
from river import drift

from bem.online.drift import (DETECTORS, Monitor, Thresholds, alarm_indices, calibrate, detection_delays,
                              false_alarms_per_10k, median_delay, simulate_stable)

TARGET = 1.0  # false alarms per 10k items


def bernoulli(rng, p, n):
    return (rng.random(n) < p).astype(float)


@pytest.fixture(scope="module")
def stable():
    return bernoulli(np.random.default_rng(0), 0.8, 3000)  # e.g. JSON validity during a stable period


@pytest.fixture(scope="module")
def calibrated(stable):
    return calibrate(stable, target_per_10k=TARGET, seed=0)


def test_known_answer_river_doc_example():
    """river's ADWIN and PageHinkley doc example: first detections at 1023 and 1006 (river 0.26.1)."""
    rng = random.Random(12345)
    data = rng.choices([0, 1], k=1000) + rng.choices(range(4, 8), k=1000)
    direct = {}
    for name, det in [("adwin", drift.ADWIN()), ("page_hinkley", drift.PageHinkley())]:
        direct[name] = next(i for i, x in enumerate(data) if (det.update(x), det.drift_detected)[1])
    _, alarms = Monitor.replay(Thresholds(), data)  # Thresholds() defaults are river's defaults
    first = {name: min(a.index for a in alarms if a.detector == name) for name in DETECTORS}
    assert direct == {"adwin": 1023, "page_hinkley": 1006}
    assert first["adwin"] == 1023 and first["page_hinkley"] == 1006
    assert 1000 <= first["two_sample"] <= 1000 + 2 * 50  # window 200, tested every 50 items
    assert all(a.direction == "up" for a in alarms if a.index < 1100)


def test_calibrated_false_alarms_on_fresh_streams(stable, calibrated):
    """Calibrated on 20×2000 resampled items (seed 0); measured on 40×2000 fresh ones (seed 1).

    Tolerance 2.5 × target: at exactly the target rate, 80k items give Poisson(8) alarms and P(≥ 20) ≈ 3e-4;
    the slack also covers the small optimism of picking the best grid point on the calibration streams.
    """
    fresh = simulate_stable(stable, n_streams=40, stream_length=2000, seed=1)
    rates = false_alarms_per_10k(calibrated, fresh)
    print("calibrated", calibrated, "fresh false alarms/10k", rates)
    assert all(rate <= 2.5 * TARGET for rate in rates.values()), rates
    # uncalibrated river defaults on the same streams: PH (threshold 50, delta 0.005) is not in score units
    loose = Thresholds(ph_threshold=2 * float(np.std(stable)), adwin_delta=0.9, two_sample_alpha=0.05)
    assert all(rate > 2.5 * TARGET for rate in false_alarms_per_10k(loose, fresh[:10]).values())


def test_ph_threshold_scales_with_score_scale(stable, calibrated):
    doubled = calibrate(2 * stable, target_per_10k=TARGET, seed=0)
    print("PH threshold scale 1:", calibrated.ph_threshold, "scale 2:", doubled.ph_threshold)
    assert doubled.ph_threshold == pytest.approx(2 * calibrated.ph_threshold)
    assert doubled.ph_delta == pytest.approx(2 * calibrated.ph_delta)
    assert doubled.two_sample_alpha == calibrated.two_sample_alpha  # rank test: scale-free
    # the scale-1 PH threshold on scale-2 scores false-alarms well above target
    fresh = 2 * simulate_stable(stable, n_streams=20, stream_length=2000, seed=1)
    assert false_alarms_per_10k(calibrated, fresh, ["page_hinkley"])["page_hinkley"] > 3 * TARGET


@pytest.mark.parametrize("before,after,direction", [(0.8, 0.5, "down"), (0.5, 0.8, "up")])
def test_detects_change_with_direction(calibrated, before, after, direction):
    rng = np.random.default_rng(2)
    streams = [np.r_[bernoulli(rng, before, 1000), bernoulli(rng, after, 1000)] for _ in range(10)]
    delays, early = detection_delays(calibrated, streams, change_at=1000)
    print(f"{before}->{after} delays", delays, "median", {k: median_delay(v) for k, v in delays.items()},
          "alarms before the change", early)
    for name in DETECTORS:
        assert None not in delays[name], name
        assert max(delays[name]) <= 400, (name, delays[name])
        assert early[name] <= 1, (name, early)  # 10 × 1000 stable items
    for stream in streams[:3]:
        _, alarms = Monitor.replay(calibrated, stream)
        for name in DETECTORS:
            first = next(a for a in alarms if a.detector == name and a.index >= 1000)
            assert first.direction == direction, first


def test_restart_fires_again_on_second_change(calibrated):
    rng = np.random.default_rng(3)
    stream = np.r_[bernoulli(rng, 0.8, 1000), bernoulli(rng, 0.4, 1000), bernoulli(rng, 0.8, 1000)]
    _, alarms = Monitor.replay(calibrated, stream)
    print("alarms", alarms)
    for name in DETECTORS:
        mine = [a for a in alarms if a.detector == name]
        assert [a.direction for a in mine if 1000 <= a.index < 1400][:1] == ["down"], (name, mine)
        assert [a.direction for a in mine if 2000 <= a.index < 2400][:1] == ["up"], (name, mine)
        assert alarm_indices(name, calibrated, stream) == [a.index for a in mine]  # monitor == detector alone


def test_replay_prefix_then_continue_equals_one_pass(calibrated):
    rng = np.random.default_rng(4)
    stream = np.r_[bernoulli(rng, 0.8, 1200), bernoulli(rng, 0.5, 800), bernoulli(rng, 0.9, 1000)]
    _, one_pass = Monitor.replay(calibrated, stream)
    monitor, alarms = Monitor.replay(calibrated, stream[:1234])
    for x in stream[1234:]:
        alarms += monitor.update(x)
    assert len(one_pass) >= 6 and alarms == one_pass
    assert monitor.n == len(stream)
