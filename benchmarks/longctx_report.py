"""The long-context study's Markdown report and PNG figures (called by benchmarks/longctx.py).

Verdicts are computed from the rows with the thresholds stated next to each claim, so a rerun that
comes out differently says so. A row holds the median over seeds in ``value`` and every seed's value
in ``per_seed`` (with ``seeds``; a row without them is one run, seed 0). A claim's threshold is applied
to the medians and to each seed (the patterns' values of that seed, over the seeds every pattern in the
threshold has); it is reproduced only when it holds for the medians and for more than half the seeds
(``holds_over_seeds``), and the verdict says "k of n seeds".

Sections of an existing report between ``<!-- longctx_<name>: begin -->`` and ``<!-- longctx_<name>: end -->``
(written by other scripts), with any text after the end marker up to the next heading, are kept as
they are when the report is rewritten.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

CHANCE = 0.1  # passkey key_len=1: one of 10 digits
CLAIMS = {
    "global_memory": "global tokens give every token access to the start of the document",
    "content_vs_position": "content-based patterns reach what positional ones cannot",
    "stability": "global tokens stabilise attention by smoothing the softmax",
    "coverage": "most attention weights are near zero, so they can be pruned",
    "cost": "sparse attention removes the quadratic cost",
}
SETTINGS = {
    "global_memory": "passkey, key_len=1 (a digit after '#', chance 10%), needle inside the first 16 positions, "
                     "question at the end of 512 tokens; tiny model (2 layers, d_model 64), lr 1e-2 (cosine to 1e-3), "
                     "batch 16, 600 steps; window 32 (reach 2 x 32 = 64 << 512), sink = window 32 + 16 global tokens; "
                     "each pattern once per seed in its row's seeds column (value: the median, spread: min..max)",
    "content_vs_position": "passkey, key_len=1, needle start uniform in [0.25, 0.75] of 512 tokens; sink = window "
                           "32 + 16 globals (48 keys/query), topk = 4 chosen blocks of 16 + own block + block 0 "
                           "(<= 96 keys/query; 2 blocks of 32 stayed at chance, see What was tried); same model and "
                           "optimiser as experiment 1; each pattern once per seed in its row's seeds column (value: "
                           "the median, spread: min..max)",
    "stability": "text (stdlib bytes), seq_len 1024, batch 4, lr 0.3 (100x the default; cosine to 0.03), 300 steps, "
                 "stats every 5; window, sink and sink_logits over seeds 0, 1, 2 (medians; every seed's value in "
                 "per_seed), dense once (seed 0: 10x the cost of a sparse run)",
    "coverage": "dense on text, seq_len 1024, batch 2, 1200 steps; candidates with window 32 and 16 globals (bigbird: "
                "+ 2 random blocks of 64); fine-tune 100 steps with the candidate from the dense checkpoint "
                "(100 more steps of training: part of any drop below the dense loss is just that)",
    "cost": "text, batch 1, sink (window 32 + 16) vs dense, 4k: 40 steps, 16k: 8 steps; "
            "the equal-time sink run gets the steps that the equal-steps runs' time ratio allows: its actual "
            "training seconds are in train_s (the shared machine's load changed between runs); each seed in its "
            "row's seeds column (value: the median, its equal-time steps from that seed's own two runs)",
}

# How the task sizes were chosen: short single-process runs (trainer/data/tasks.py batches, the model with
# plain AdamW at a constant learning rate after 10 warmup steps, not the trainer; measured on this
# machine while it was shared), before the study.
NOTES = [
    "key_len=8 (the whole key copied by an induction head), seq_len 256, dense: exact-digit accuracy 0.12 "
    "(lr 1e-2, batch 8) and 0.17 (lr 3e-3, batch 16) after 400 steps (chance 0.10): too slow for this machine.",
    "key_len=2, seq_len 256, dense, lr 3e-3, batch 16: 0.31 per-digit, 0.03 exact after 300 steps.",
    "key_len=1 (the single digit after '#'), seq_len 256, dense, lr 1e-2, batch 16: 0.88 after 100 steps, 1.00 "
    "after 150. Chosen: the claims are about reaching a token, not about copying a long string.",
    "key_len=1, seq_len 512, needle in the first 16 positions, window 64, lr 1e-2, batch 16, after 200 steps: dense "
    "0.63, sink 0.53, window 0.09 (chance); hence 300 steps with a cosine decay in the study, and window 32 so the "
    "question (position 511) is 8x beyond the window pattern's reach of 2 x 32.",
    "topk with 2 chosen blocks of 32 stayed at chance in the trainer: 0.08 at 300 steps and 0.09 at 600. Exploration "
    "with 4 blocks of 16, needle at depth 0.25-0.75, seq_len 512, lr 1e-2, batch 16: 0.09 at 300 steps, 0.23 at 350, "
    "0.39 at 400, 0.56 at 450, 0.73 at 500 (routing is learned late: causal top-k ranks key blocks by each query "
    "block's first query, and only chosen blocks get a gradient). Hence 4 x 16 and 600 steps.",
    "At 300 steps (the earlier --quick) dense reached only 0.49 on global_memory and 0.30 on content_vs_position, "
    "and top-k stayed at chance; at 600 steps every pattern that can reach the key does. So --quick ran "
    "experiments 1 and 2 at the full 600 steps (until 2026-12-04: --quick is now issue 26's length_generalisation and "
    "streaming, see '--quick against the full runs').",
    "Stability at lr 3e-2, 150 steps, one seed (the first full run): no spikes, entropy std sink 0.0098 vs window "
    "0.0102, so the claim was not stressed. Probes at 300 steps (one run each): lr 0.1 seed 0: window 0.026, sink "
    "0.0027; lr 0.3 seed 0: window 0.54, sink 0.0053; lr 0.3 seed 1: window 0.0076, sink 0.032, sink_logits 0.051 "
    "(max logits 4e3 to 8e4: the logits explode at these rates, the loss does not spike). One run's spread hangs on "
    "whether a collapse happens in it, so the study now takes the median of three seeds at lr 0.3.",
    "Coverage depends on how trained the dense model is: after 300 steps (3.59 bits/byte, the first full run) window, "
    "sink and bigbird kept 0.18-0.45 of the mass in the lowest layer; a probe at 1200 steps (2.74 bits/byte) gave "
    "0.55-0.67 (substituted eval loss +0.6% to +1.7%). Hence 1200 steps.",
    "What the stability runs show instead (read from their metrics.jsonl): at lr 0.3 every run's loss jumps from "
    "5.2-5.3 to 8-11 nats at steps 4-7, as warmup reaches the peak rate, before the 20-step history the spike rule "
    "needs (peak, median over seeds: window 9.6, sink 9.6, sink_logits 9.0; dense 11.4, one seed), and in every run "
    "the layer-mean attention entropy collapses to below 0.03 nats at some logged step. Sink tokens and sink logits "
    "did not prevent either.",
    "Issue 26: a rerun of --quick on another machine gave top-k 0.094 (chance) on content_vs_position where one run "
    "here had given 0.656, and dense 0.789 on global_memory where it had given 0.992: BLAS rounding differs between "
    "machines and a late-learned routing flips. Hence every pattern of experiments 1-3 over seeds 0, 1, 2, and a "
    "verdict that needs the threshold to hold for the medians and for most seeds; a row without per_seed is one "
    "run (seed 0) of an earlier invocation, and a verdict resting on it says '1 of 1 seeds'.",
    "The seeds rerun of content_vs_position (sink and topk, 2026-12-03, this tree) gave sink on seed 0 exactly what "
    "the one-seed run of 2026-11-29 had (0.09375, the same depth bins), but top-k on seed 0 0.172 where that run had "
    "0.656: top-k's outcome flips even for one seed between the two trees (or loads); its three seeds are in the table.",
    "Not tried, for lack of machine time: coverage on a much stronger text model, cost beyond 16k, more than three "
    "seeds, and more than one seed for coverage (one run).",
]


def _rows(result: dict, experiment: str, metric: str) -> list[dict]:
    return [r for r in result["rows"] if r["experiment"] == experiment and r["metric"] == metric]


def _val(result, experiment, pattern, metric, **match):
    for r in _rows(result, experiment, metric):
        if r["pattern"] == pattern and all(r.get(k) == v for k, v in match.items()):
            return r["value"]
    return None


def _ok(x) -> bool:
    return x is not None and not math.isnan(x)


def seed_values(row: dict) -> dict[int, float]:
    """A row's value per seed: ``per_seed`` by ``seeds`` (space-separated); a row without ``per_seed`` is
    one run of seed 0 (the trainer's default seed, which every run before the seeds had)."""
    if "per_seed" not in row:
        return {0: row["value"]} if _ok(row["value"]) else {}
    seeds = [int(x) for x in str(row.get("seeds", "")).split()]
    vals = [float(x) for x in str(row["per_seed"]).split()]
    if len(seeds) != len(vals):
        raise ValueError(f"row {row['experiment']}/{row['pattern']}/{row['metric']}: {len(seeds)} seeds, "
                         f"{len(vals)} per_seed values")
    return dict(zip(seeds, vals))


def holds_over_seeds(median_holds: bool, seed_holds: list[bool]) -> bool:
    """The reproduction rule: the threshold holds for the medians and for more than half the seeds."""
    return median_holds and 2 * sum(seed_holds) > len(seed_holds)


Key = tuple[str, str]  # (pattern, metric)
Tier = tuple[str, tuple[Key, ...], Callable[[dict], bool]]  # word, the values it needs, threshold on them


def judge(result: dict, experiment: str, tiers: list[Tier], fallback: str = "not reproduced") -> dict | None:
    """The word of the first tier (strongest first) whose threshold holds over the seeds
    (``holds_over_seeds``), else ``fallback``; with, for that tier (the first one when none holds), whether
    the medians pass and the seeds that do. None when a value is missing or NaN (a run failed)."""
    keys = list(dict.fromkeys(k for _, need, _ in tiers for k in need))
    rows = {k: next((r for r in _rows(result, experiment, k[1]) if r["pattern"] == k[0]), None) for k in keys}
    if any(r is None or not _ok(r["value"]) for r in rows.values()):
        return None
    medians = {k: r["value"] for k, r in rows.items()}
    per = {k: seed_values(r) for k, r in rows.items()}
    checked = []
    for word, need, pred in tiers:
        common = sorted(set.intersection(*(set(per[k]) for k in need)))
        passing = [s for s in common if pred({k: per[k][s] for k in need})]
        checked.append({"word": word, "median_holds": pred(medians), "seeds": common, "passing": passing,
                        "holds": holds_over_seeds(pred(medians), [s in passing for s in common])})
    chosen = next((c for c in checked if c["holds"]), None)
    return {**(chosen or checked[0]), "word": chosen["word"] if chosen else fallback, "medians": medians,
            "rows": rows}


def _seed_note(j: dict) -> str:
    n, k = len(j["seeds"]), len(j["passing"])
    return (f"{k} of {n} seed{'s' if n != 1 else ''}" + ("" if j["median_holds"] else "; the medians fail")
            + ("; fewer than 3 seeds" if n < 3 else ""))


def _spread(row: dict) -> str:
    return f" [{row['spread']}]" if row.get("spread") else ""


def _verdict(result: dict, experiment: str) -> tuple[str, str | None, str]:
    """(word, seeds note or None, details) of ``experiment``'s claim."""
    if experiment == "global_memory":
        w, s, d = ("window", "acc"), ("sink", "acc"), ("dense", "acc")
        core = lambda x: x[w] <= CHANCE + 0.15 and x[s] >= 0.9  # noqa: E731 - the claim itself: globals reach what the window cannot
        j = judge(result, experiment, [("reproduced", (w, s, d), lambda x: core(x) and x[d] >= 0.9),
                                       ("partly reproduced (window vs sink)", (w, s), core)])
        if j is None:
            return "incomplete (a run failed)", None, ""
        m, r = j["medians"], j["rows"]
        return (j["word"], _seed_note(j), f"median window {m[w]:.2f}{_spread(r[w])} (chance {CHANCE:.2f}), sink "
                f"{m[s]:.2f}{_spread(r[s])}, dense {m[d]:.2f}{_spread(r[d])} (threshold: window <= chance + 0.15, "
                "sink and dense >= 0.90)")
    if experiment == "content_vs_position":
        s, t, d = ("sink", "acc"), ("topk", "acc"), ("dense", "acc")
        j = judge(result, experiment, [("reproduced", (s, t), lambda x: x[t] - x[s] >= 0.3)])
        dense = next((r for r in _rows(result, experiment, "acc") if r["pattern"] == "dense"), None)
        if j is None or dense is None or not _ok(dense["value"]):
            return "incomplete (a run failed)", None, ""
        m, r = j["medians"], j["rows"]
        return (j["word"], _seed_note(j), f"median topk {m[t]:.2f}{_spread(r[t])} vs sink {m[s]:.2f}{_spread(r[s])} "
                f"(dense {dense['value']:.2f}{_spread(dense)}); threshold: topk at least 0.30 above sink")
    if experiment == "stability":
        w, s, ws, ss = ("window", "entropy_std"), ("sink", "entropy_std"), ("window", "spikes"), ("sink", "spikes")
        j = judge(result, experiment, [("reproduced", (w, s, ws, ss), lambda x: x[s] <= 0.8 * x[w] and x[ss] <= x[ws])])
        if j is None:
            return "incomplete (a run failed)", None, ""
        m = j["medians"]
        calm = all(r["value"] == 0 for r in _rows(result, experiment, "spikes"))
        lg = _val(result, experiment, "sink_logits", "entropy_std")
        return (j["word"], _seed_note(j), f"median entropy std sink {m[s]:.4f} vs window {m[w]:.4f}"
                + (f" (learned sink logits {lg:.4f})" if _ok(lg) else "")
                + f", spikes (total over seeds) sink {m[ss]:.0f} vs window {m[ws]:.0f} (threshold: sink spread at least "
                "20% lower, no more spikes; per seed: that seed's values)" + ("; no run had a single spike" if calm else ""))
    if experiment == "cost":
        word, details, note = _cost_verdict(result)
        return word, note, details
    word, details = _coverage_verdict(result)
    return word, (None if word.startswith("incomplete") else "one run, seed 0: not repeated over seeds"), details


def verdict(result: dict, experiment: str) -> str:
    word, note, details = _verdict(result, experiment)
    return word + (f" ({note})" if note else "") + (f": {details}" if details else "")


def summary(result: dict, experiment: str) -> str:
    """The verdict table's cell: the word without its qualifier, and the seeds note."""
    word, note, _ = _verdict(result, experiment)
    return word.split(" (")[0] + (f" ({note})" if note else "")


def _coverage_verdict(result: dict) -> tuple[str, str]:
    """Two halves: is most of the mass on few keys (a candidate keeps >= 90% in every layer), and does
    pruning cost little (substituted eval loss within 5% of dense, or within 2% after fine-tune)."""
    parts, mass, cheap = [], False, False
    for name in ("sink", "window", "bigbird"):
        cov = [r["value"] for r in _rows(result, "coverage", "coverage") if r["pattern"] == name]
        losses = {r.get("stage", ""): r for r in _rows(result, "coverage", "eval_loss") if r["pattern"] == name}
        sub = next((r for k, r in losses.items() if k.startswith("dense")), None)
        tuned = next((r for k, r in losses.items() if k.startswith("after")), None)
        if not cov or sub is None:
            continue
        base = sub["dense_eval_loss"]
        parts.append(f"{name}: min layer coverage {min(cov):.3f}, eval loss {base:.3f} -> {sub['value']:.3f} substituted"
                     + (f", {tuned['value']:.3f} after fine-tune" if tuned else ""))
        mass |= min(cov) >= 0.9
        cheap |= sub["value"] <= 1.05 * base or (tuned is not None and tuned["value"] <= 1.02 * base)
    if not parts:
        return "incomplete (a run failed)", ""
    word = ("reproduced" if mass and cheap else "partly reproduced (pruning is cheap, but the mass is not on few keys)"
            if cheap else "not reproduced")
    return (word, "thresholds: a candidate keeps >= 90% of the mass in every layer; its eval loss is within 5% of "
            "dense substituted, or 2% after fine-tune; " + "; ".join(parts))


def _cost_row(result: dict, pattern: str, seq_len: int) -> dict | None:
    return next((r for r in _rows(result, "cost", "bpb_equal_time") if r["pattern"] == pattern
                 and r.get("seq_len") == seq_len and _ok(r["value"])), None)


def _cost_verdict(result: dict) -> tuple[str, str, str | None]:
    """Sink below dense in bits/byte at equal training time, at 4k and at 16k: for the medians and for more
    than half of the seeds (a seed: that seed's two runs at both lengths). (word, details, seeds note)."""
    parts, medians, by_seed = [], [], {}
    for seq_len in (4096, 16384):
        s, d = _cost_row(result, "sink", seq_len), _cost_row(result, "dense", seq_len)
        if s is None or d is None:
            continue
        sv, dv = seed_values(s), seed_values(d)
        parts.append(f"{seq_len}: sink {s['value']:.3f}{_spread(s)} vs dense {d['value']:.3f}{_spread(d)} bits/byte "
                     "at equal time")
        medians.append(s["value"] < d["value"])
        for seed in set(sv) & set(dv):
            by_seed.setdefault(seed, []).append(sv[seed] < dv[seed])
    if not parts:
        return "incomplete (a run failed)", "", None
    seeds = sorted(seed for seed, ok in by_seed.items() if len(ok) == len(parts))  # measured at every length
    passing = [seed for seed in seeds if all(by_seed[seed])]
    j = {"seeds": seeds, "passing": passing, "median_holds": all(medians)}
    word = "reproduced" if holds_over_seeds(all(medians), [seed in passing for seed in seeds]) else "not reproduced"
    return word, "threshold: sink lower bpb at equal time; " + "; ".join(parts), _seed_note(j)


def _with_longer(result: dict, extra: dict, experiment: str) -> dict:
    """``result`` with the rows of ``experiment`` replaced, pattern by pattern, by those of ``extra``."""
    redone = {r["pattern"] for r in extra["rows"] if r["experiment"] == experiment}
    rows = [r for r in result["rows"] if not (r["experiment"] == experiment and r["pattern"] in redone)]
    return {**result, "rows": rows + [r for r in extra["rows"] if r["experiment"] == experiment]}


def _all_longer(result: dict, longer: list[dict], experiment: str) -> dict:
    for extra in longer:  # in order: a later run of a pattern replaces an earlier one
        if experiment in extra["experiments"]:
            result = _with_longer(result, extra, experiment)
    return result


def _table(result: dict, experiment: str) -> list[str]:
    rows = [r for r in result["rows"] if r["experiment"] == experiment]
    first = ("spread", "per_seed", "seeds")
    extras = sorted({k for r in rows for k in r} - {"experiment", "pattern", "metric", "value", *first})
    head = ["pattern", "metric", "value", *[k for k in first if any(k in r for r in rows)], *extras]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = lambda x: f"{x:.4g}" if isinstance(x, float) else ("" if x is None else str(x))  # noqa: E731
    for r in rows:
        out.append("| " + " | ".join(fmt(r.get(k)) for k in head) + " |")
    return out


def figures(result: dict, curves: dict, fig_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir.mkdir(parents=True, exist_ok=True)
    made = []
    acc_exps = [e for e in ("global_memory", "content_vs_position") if _rows(result, e, "acc")]
    if acc_exps:
        fig, axes = plt.subplots(1, len(acc_exps), figsize=(5 * len(acc_exps), 3.5), squeeze=False)
        for ax, e in zip(axes[0], acc_exps):
            rows = _rows(result, e, "acc")
            ax.bar([r["pattern"] for r in rows], [r["value"] for r in rows], color="tab:blue", label="median over seeds")
            for r in rows:  # every seed's value
                seeds = seed_values(r)
                ax.plot([r["pattern"]] * len(seeds), list(seeds.values()), "k.", ms=6)
            ax.axhline(CHANCE, ls="--", color="gray", label="chance")
            ax.set_ylim(0, 1.05), ax.set_title(e), ax.set_ylabel("passkey accuracy"), ax.legend()
        made.append(_save(fig, fig_dir / "accuracy_by_pattern.png"))
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for e in acc_exps:
            for r in _rows(result, e, "acc"):
                bins = sorted((k, v) for k, v in r.items() if k.startswith("acc@") and v is not None)
                if bins:
                    ax.plot([float(k[4:]) for k, _ in bins], [v for _, v in bins], "o-", label=f"{e}: {r['pattern']}")
        ax.set_xlabel("needle start (fraction of seq_len, bin lower edge)"), ax.set_ylabel("accuracy"), ax.legend(fontsize=7)
        made.append(_save(fig, fig_dir / "accuracy_by_depth.png"))
    for e, runs in curves.items():
        keys = [("train/loss", "train loss")]
        if any(k.endswith("/entropy_mean") for rows in runs.values() for r in rows for k in r):
            keys += [("entropy", "attention entropy (mean over layers)"), ("max_logit", "max logit (over layers)")]
        fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
        for ax, (key, title) in zip(axes[0], keys):
            for label, rows in runs.items():
                xs, ys = _series(rows, key)
                ax.plot(xs, ys, label=label, lw=1)
            ax.set_title(f"{e}: {title}", fontsize=9), ax.set_xlabel("step"), ax.legend(fontsize=7)
        made.append(_save(fig, fig_dir / f"curves_{e}.png"))
    return made


def _series(rows: list[dict], key: str):
    if key == "train/loss":
        return [r["step"] for r in rows], [r["train/loss"] for r in rows]
    suffix = "/entropy_mean" if key == "entropy" else "/max_logit"
    pts = [(r["step"], [v for k, v in r.items() if k.startswith("attn/") and k.endswith(suffix)]) for r in rows]
    pts = [(s, vs) for s, vs in pts if vs]
    agg = (lambda vs: sum(vs) / len(vs)) if key == "entropy" else max
    return [s for s, _ in pts], [agg(vs) for _, vs in pts]


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


def write_report(result: dict, curves: dict, report: Path, fig_dir: Path, notes: list[str] = tuple(NOTES),
                 longer: list[dict] = ()) -> None:
    made = figures(result, curves, fig_dir)
    rel = fig_dir.relative_to(report.parent) if fig_dir.is_relative_to(report.parent) else fig_dir
    cmd = result.get("command") or "python -m benchmarks.longctx" + (" --quick" if result["quick"] else "")
    lines = ["# Long-context study (benchmarks/longctx.py)", "",
             f"`{cmd}` — {'quick run' if result['quick'] else 'full settings'}, wall time {result['wall_s']:.0f} s on "
             "this 2-core CPU machine (shared with other jobs while it ran: times are not benchmarks). Every training "
             "is `torchrun --nproc_per_node 2 -m trainer.train parallel=sp2` (SP=2, fp32, gloo), W&B offline, group "
             f"`{result.get('wandb_group')}`. Experiments: {', '.join(result['experiments'])}.", ""]
    if result.get("cpu"):  # kernels.cpu.describe() of the machine it ran on
        lines += ["```", *result["cpu"].splitlines(), "```", ""]
    if result.get("combined_by"):
        lines += [f"This report joins several invocations: `{result['combined_by']}`.", ""]
    lines += ["| # | claim | verdict |", "|---|---|---|"]
    for i, e in enumerate(CLAIMS, 1):
        final = summary(result, e) if e in result["experiments"] else "not run"
        if any(e in extra["experiments"] for extra in longer):
            final = summary(_all_longer(result, longer, e), e) + " (with the longer runs)"
        lines.append(f"| {i} | {e}: {CLAIMS[e]} | {final} |")
    for i, (e, sec) in enumerate(result.get("sections", {}).items(), len(CLAIMS) + 1):  # issue 26's, own modules
        lines.append(f"| {i} | {e} (its section below) | {sec['verdict']} |")
    lines += ["", "A claim is reproduced when its threshold holds for the medians over seeds and for more than "
              "half the seeds (k of n: the seeds that every pattern in the threshold was run with).", ""]
    if result.get("incomplete"):
        lines += [f"**Interrupted**: {result['incomplete']}.", ""]
    m = result.get("merged")
    while m:  # each earlier invocation merged in, newest first
        carried = "; ".join(f"{e}: {', '.join(ps)}" for e, ps in m.get("patterns", {}).items())
        lines += [f"From an earlier invocation (`{m.get('command')}`, {'--quick' if m['quick'] else 'full'}, "
                  f"{m['wall_s']:.0f} s, W&B group `{m['wandb_group']}`): "
                  + (f"experiments {', '.join(m['experiments'])}" if m["experiments"] else "no whole experiment")
                  + (f"; the patterns not rerun since, in experiments rerun ({carried}; their rows' source column)"
                     if carried else "") + ". The wall time above is this invocation's.", ""]
        m = m.get("merged")
    for i, e in enumerate(CLAIMS, 1):
        if e not in result["experiments"]:
            if result["quick"]:  # a quick run is issue 26's experiments only
                continue
            lines += [f"## {i}. {e} — not run", "", f"Claim: \"{CLAIMS[e]}\". Not run in this invocation "
                      f"(`python -m benchmarks.longctx --only {e}`).", ""]
            continue
        lines += [f"## {i}. {e}", "", f"Claim: \"{CLAIMS[e]}\".", "", f"Setup: {SETTINGS[e]}.", "",
                  f"**Verdict: {verdict(result, e)}.**", ""]
        if any(e in extra["experiments"] for extra in longer):
            lines += [f"**With the longer runs below** (their patterns replace these, later runs last): "
                      f"{verdict(_all_longer(result, longer, e), e)}.", ""]
        lines += [*_table(result, e), ""]
    for extra in longer:
        lines += [f"## Longer training: {', '.join(extra['experiments'])}", "",
                  f"`{extra.get('command')}` ({extra['wall_s']:.0f} s, W&B group `{extra.get('wandb_group')}`): patterns "
                  "that had not converged (or were retuned), given more steps; the overrides column says exactly "
                  "what ran.", "", *[line for e in extra["experiments"] for line in (f"**{e}**", "", *_table(extra, e), "")]]
    if notes:
        lines += ["## What was tried", "", *[f"- {n}" for n in notes], ""]
    kept = sorted(p.name for p in fig_dir.glob("*.png") if p.name not in made)  # e.g. curves of runs not here
    lines += ["## Figures", "", *[f"![{m}]({rel}/{m})" for m in made]]
    if kept:
        lines += ["", "From earlier invocations (their run directories are not here to redraw them from):", "",
                  *[f"![{m}]({rel}/{m})" for m in kept]]
    before, after = _foreign_sections(report.read_text() if report.exists() else "")
    if before:  # other scripts' sections: after the study's experiments, before its notes
        at = lines.index("## What was tried") if "## What was tried" in lines else lines.index("## Figures")
        lines[at:at] = [*before, ""]
    lines += ["", *after] if after else [""]
    report.write_text("\n".join(lines).rstrip("\n") + "\n")


def _foreign_sections(text: str) -> tuple[list[str], list[str]]:
    """The lines of an existing report's marked sections (``<!-- longctx_<name>: begin -->`` to its end
    marker, with the text after it up to the next ``## `` heading or marked section): those before its
    "## What was tried" and those after it."""
    lines, before, after, i = text.splitlines(), [], [], 0
    notes = lines.index("## What was tried") if "## What was tried" in lines else len(lines)
    while i < len(lines):
        line = lines[i]
        if not (line.startswith("<!-- longctx_") and line.endswith(": begin -->")):
            i += 1
            continue
        end, start = line.replace(": begin -->", ": end -->"), i
        while i < len(lines) and lines[i] != end:
            i += 1
        i += 1
        while i < len(lines) and not lines[i].startswith(("## ", "<!-- longctx_")):
            i += 1
        block = lines[start:i]
        while block and not block[-1].strip():
            block.pop()
        (before if start < notes else after).extend([*block, ""])
    return before[:-1], after[:-1]
