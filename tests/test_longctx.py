"""The long-context study's own arithmetic (benchmarks/longctx.py, longctx_report.py): the spike
definition, the per-seed aggregation of the stability metrics and the verdict thresholds — the
parts of the report that are computed, not measured."""

from __future__ import annotations

import math

from benchmarks.longctx import Study, run_stability, spikes, stability_rows
from benchmarks.longctx_report import verdict


def test_spikes_count_steps_above_the_running_median():
    flat = [2.0] * 40
    assert spikes(flat) == 0
    bumped = flat[:30] + [3.1] + flat[31:]  # 3.1 > 1.5 x 2.0: one spike
    assert spikes(bumped) == 1
    assert spikes(flat[:30] + [2.9] + flat[31:]) == 0  # 2.9 < 3.0: not a spike
    assert spikes([9.0] * 5 + flat) == 0  # the first 20 steps have no history: never counted


def _run(entropies, losses=None, logit=10.0, final=2.5):
    """Metrics rows of one run: entropy logged every step for 2 layers, eval on the last row."""
    rows = []
    for step, e in enumerate(entropies, 1):
        rows.append({"step": step, "train/loss": (losses or [3.0] * len(entropies))[step - 1],
                     "attn/layer0/entropy_mean": e, "attn/layer1/entropy_mean": e + 1.0,
                     "attn/layer0/max_logit": logit, "attn/layer1/max_logit": logit / 2})
    rows[-1].update({"eval/loss": final, "eval/bpb": final / math.log(2)})
    return rows


def test_stability_metrics_of_one_run():
    # Second half (steps 3 and 4 of 4): layer means 1.5 and 2.5 -> population std 0.5.
    m = run_stability(_run([9.0, 9.0, 1.0, 2.0]))
    assert m["entropy_std"] == 0.5
    assert m["max_logit"] == 10.0 and m["final_loss"] == 2.5 and m["spikes"] == 0


def test_stability_rows_take_the_median_over_seeds_and_total_the_spikes():
    study = Study(root=None, group="g", timeout=0)
    spiky = [3.0] * 25 + [6.0] + [3.0] * 4  # one spike
    runs = [(0, _run([0.0] * 15 + [1.0, 2.0] * 7 + [1.0], spiky, final=2.0)),
            (1, _run([0.0] * 30, final=3.0)),
            (2, _run([0.0] * 15 + [1.0, 3.0] * 7 + [1.0], spiky, final=4.0))]
    stability_rows(study, "window", runs)
    rows = {r["metric"]: r for r in study.rows}
    per_seed = [float(x) for x in rows["entropy_std"]["per_seed"].split()]
    assert per_seed[1] == 0.0 and per_seed[0] < per_seed[2]
    # The median of three; per_seed is printed to 4 significant digits, hence the relative 1e-3.
    assert math.isclose(rows["entropy_std"]["value"], per_seed[0], rel_tol=1e-3)
    assert rows["spikes"]["value"] == 2  # a total, not a median
    assert rows["final_loss"]["value"] == 3.0
    assert rows["entropy_std"]["seeds"] == "0 1 2"


def _result(window_std, sink_std, window_spikes=0, sink_spikes=0):
    rows = [{"experiment": "stability", "pattern": p, "metric": m, "value": v}
            for p, m, v in (("window", "entropy_std", window_std), ("sink", "entropy_std", sink_std),
                            ("window", "spikes", window_spikes), ("sink", "spikes", sink_spikes))]
    return {"rows": rows}


def test_stability_verdict_thresholds():
    assert verdict(_result(0.10, 0.08), "stability").startswith("reproduced")  # exactly 20% lower
    assert verdict(_result(0.10, 0.081), "stability").startswith("not reproduced")
    assert verdict(_result(0.10, 0.01, window_spikes=0, sink_spikes=1), "stability").startswith("not reproduced")
    assert verdict(_result(0.10, float("nan")), "stability").startswith("incomplete")
