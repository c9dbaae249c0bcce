"""How much of a trained model's attention a sparser pattern keeps, and what substituting it costs.

    python -m trainer.coverage trainer.resume=CKPT candidates=[sink,window,bigbird] \
        [candidate.window_left=128 candidate.num_global=16] [eval_batches=4] [json=out.json]

CKPT is a checkpoint directory written by the trainer (``<run>/checkpoints/step_N``); the run's
``config.yaml`` (found beside ``checkpoints/`` or in any parent) gives the model, the data and
seq_len, and any other ``key=value`` overrides it. ``candidates`` name ``conf/attention/*.yaml``
options; ``candidate.KEY=VALUE`` sets KEY in every candidate that uses it.

Coverage, exactly. For a query with scaled scores s over the keys its trained pattern P allows,
p = softmax_P(s), and a candidate C ⊆ P keeps the mass Σ_{j∈C} p_j = exp(lse_C − lse_P), where
lse_X is the log-sum-exp of s over X: the kernel's own second output, run on the very q and k of
the layer. No probability matrix is formed, so this works at any length the kernel handles. A
candidate that allows keys outside P is refused (its "mass" would exceed 1). Per layer the table
shows the mean over heads, queries and eval sequences, and the worst head's mean.

Eval loss: the same eval batches (validation text, or the task's eval stream for ``data.task``)
with the trained pattern, then with every layer's pattern replaced by each candidate — the model
is not retrained. Runs on one process (CPU or the current GPU).
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import torch

from kernels import attend
from kernels.contract import AttnCall, AttnResult
from model.attention import local_attention
from model.pattern import Dense, Pattern, from_config
from model.transformer import Transformer

CONF = Path(__file__).resolve().parents[2] / "conf"
TOOL_KEYS = ("candidates", "candidate", "json")


class CoverageError(ValueError):
    """A bad tool setting; one line naming it."""


def pattern_coverage(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, own: Pattern, cand: Pattern,
                     call: AttnCall, backend: str = "auto") -> torch.Tensor:
    """[B, H, Q]: the softmax mass under ``own`` that the keys of ``cand`` carry, exp(lse_C − lse_P),
    with the call's positions, learned sinks (both softmaxes have the sink column: every candidate
    keeps it, as the model would run it) and documents (both see only the query's own document)."""
    lse_own = attend(q, k, v, own, call, backend).lse
    lse_cand = attend(q, k, v, cand, call, backend).lse
    return torch.exp(lse_cand.double() - lse_own.double())


def check_subset(cand: Pattern, own: Pattern, seq_len: int, name: str, chunk: int = 256) -> None:
    """CoverageError unless every key ``cand`` allows is one ``own`` allows (positional part)."""
    if isinstance(own, Dense) and own.causal and cand.causal:
        return  # a causal pattern never leaves causal dense attention
    keys = torch.arange(seq_len)
    for lo in range(0, seq_len, chunk):
        q = torch.arange(lo, min(lo + chunk, seq_len))
        c = cand.mask(q, keys, seq_len) if not cand.content_based else Dense(causal=cand.causal).mask(q, keys, seq_len)
        if (c & ~own.mask(q, keys, seq_len)).any():
            raise CoverageError(f"candidates: {name} allows keys the checkpoint's own pattern does not (coverage "
                                "is measured against the trained pattern); pick candidates inside it")


class Recorder:
    """An ``AttentionFn`` (model.attention's contract, sinks and documents included) that computes
    the layer with its own pattern and, on the side, each candidate's coverage; sums per layer and
    candidate ([H] sums of the mean over queries)."""

    def __init__(self, candidates: dict[str, Pattern], backend: str):
        self.candidates, self.backend = candidates, backend
        self.sums: dict[tuple[int, str], torch.Tensor] = {}
        self.count: dict[int, int] = {}

    def __call__(self, q, k, v, pattern, call: AttnCall) -> AttnResult:
        res = attend(q, k, v, pattern, call, self.backend)
        for name, cand in self.candidates.items():
            cov = pattern_coverage(q, k, v, pattern, cand, call, self.backend)  # (B, H, Q)
            key = (call.layer, name)
            self.sums[key] = self.sums.get(key, 0) + cov.sum(dim=(0, 2)).cpu()
        self.count[call.layer] = self.count.get(call.layer, 0) + q.shape[0] * q.shape[2]
        return res

    def table(self) -> dict[str, list[dict]]:
        """{candidate: per layer {"mean", "min_head"}}."""
        return {name: [{"mean": float(self.sums[(i, name)].mean() / self.count[i]),
                        "min_head": float(self.sums[(i, name)].min() / self.count[i])}
                       for i in sorted(self.count)] for name in self.candidates}


@torch.no_grad()
def measure(model: Transformer, batches: list, candidates: dict[str, Pattern], backend: str = "auto") -> dict:
    """Coverage per layer and eval loss (mean nats over the scored targets) with the trained patterns
    and with each candidate substituted in every layer. ``batches``: (inputs, targets, positions[,
    rope positions, document ids]) as ``LongDocSampler.next_shard`` gives them."""
    rec = Recorder(candidates, backend)
    own = list(model.patterns)

    def loss_with(fn) -> float:
        total = n = 0.0
        for x, y, pos, *docs in batches:
            out = model(x, positions=pos, attention_fn=fn, targets=y, seq_len=int(pos[-1]) + 1,
                        **dict(zip(("rope_positions", "doc_ids"), docs)))
            total, n = total + float(out.loss) * float(out.n_targets), n + float(out.n_targets)
        return total / max(n, 1.0)

    base = loss_with(rec)
    losses = {}
    plain = functools.partial(local_attention, backend=backend)  # the layer as the model computes it
    try:
        for name, cand in candidates.items():
            model.patterns = [cand] * len(own)
            losses[name] = loss_with(plain)
    finally:
        model.patterns = own
    return {"coverage": rec.table(), "eval_loss": losses, "eval_loss_trained": base}


# --- the command line ------------------------------------------------------------------------------

def parse_args(argv: list[str]):
    """(config overrides, candidate names, per-candidate settings, json path)."""
    overrides, names, cand_kv, out = [], None, {}, None
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not eq:
            raise CoverageError(f"{arg}: arguments are key=value (e.g. trainer.resume=CKPT candidates=[sink,window])")
        if key == "candidates":
            names = [n.strip() for n in value.strip("[]").split(",") if n.strip()]
        elif key.startswith("candidate."):
            import yaml

            cand_kv[key.removeprefix("candidate.")] = yaml.safe_load(value)
        elif key == "json":
            out = value
        else:
            overrides.append(arg)
    if not names:
        raise CoverageError("candidates: required, a list of conf/attention options, e.g. candidates=[sink,window]")
    return overrides, names, cand_kv, out


def run_config(ckpt: Path, overrides: list[str]):
    """The checkpoint's run config with ``overrides`` applied, validated for one process."""
    from omegaconf import OmegaConf

    from trainer.config.validate import load_config

    found = next((d / "config.yaml" for d in ckpt.resolve().parents if (d / "config.yaml").is_file()), None)
    if found is None:
        raise CoverageError(f"trainer.resume: no config.yaml of the run in any parent of {ckpt}")
    base = OmegaConf.load(found)
    base.trainer.ckpt_dir = str(ckpt.parent)  # the run's own value names a Hydra directory
    cfg = OmegaConf.merge(base, OmegaConf.from_dotlist(overrides))
    cfg.parallel.sequence_parallel_size = 1
    return load_config(cfg, world_size=1)


def load_candidates(names: list[str], cand_kv: dict, seq_len: int) -> dict[str, Pattern]:
    import yaml

    from model.pattern import PatternError

    allowed = sorted(p.stem for p in (CONF / "attention").glob("*.yaml"))
    out = {}
    for name in names:
        if name not in allowed:
            raise CoverageError(f"candidates: unknown pattern {name!r}; allowed: {', '.join(allowed)}")
        node = yaml.safe_load((CONF / "attention" / f"{name}.yaml").read_text())
        node.update({k: v for k, v in cand_kv.items() if k in node})  # every shipped yaml lists num_global
        try:
            out[name] = from_config(node, seq_len)
        except PatternError as e:
            raise CoverageError(f"candidate {name}: {e}") from None
    return out


def eval_batches(cfg) -> list:
    """The trainer's evaluation batches (one process): validation windows, or the task's eval stream."""
    from trainer.data.corpus import corpus_of
    from trainer.data.sampling import LongDocSampler

    if getattr(cfg.data, "task", "text") != "text":
        from trainer.data.tasks import EVAL_STREAM, TaskSampler, task_params

        corpus = corpus_of(cfg.data)
        sampler = TaskSampler(task_params(cfg.data), cfg.seq_len, cfg.batch_size, cfg.seed,
                              reserved=cfg.model.n_learned_global, text_tokens=corpus.val, stream=EVAL_STREAM)
    else:
        d = cfg.data
        corpus = corpus_of(d)
        sampler = LongDocSampler(corpus.val, cfg.seq_len, cfg.batch_size, cfg.seed, documents=d.document_mask,
                                 reset_positions=d.resets_positions)
    return [sampler.next_shard(0, 1) for _ in range(cfg.eval_batches)]


def load_model(cfg, ckpt: Path) -> Transformer:
    """The checkpoint's weights (every ZeRO stage, strict keys, weights_only) in the model ``cfg`` describes."""
    from trainer.state.run import load_run

    return load_run(ckpt, "cpu", cfg)[1]


def format_table(result: dict) -> str:
    names = list(result["coverage"])
    lines = ["attention mass kept (mean over heads and queries; worst head in brackets)",
             f"{'layer':<8}" + "".join(f"{n:>22}" for n in names)]
    for i in range(len(next(iter(result["coverage"].values())))):
        cells = [result["coverage"][n][i] for n in names]
        lines.append(f"{i:<8}" + "".join(f"{c['mean']:>13.4f} [{c['min_head']:.3f}]" for c in cells))
    lines.append(f"{'eval loss':<8}" + "".join(f"{result['eval_loss'][n]:>22.4f}" for n in names)
                 + f"   (trained pattern: {result['eval_loss_trained']:.4f} nats/target)")
    return "\n".join(lines)


def main(argv: list[str]) -> dict:
    from trainer.config.validate import ConfigError
    from trainer.data.corpus import DataConfigError

    try:
        overrides, names, cand_kv, out = parse_args(argv)
        resume = next((a.split("=", 1)[1] for a in overrides if a.startswith("trainer.resume=")), None)
        if resume is None:
            raise CoverageError("trainer.resume: required, the checkpoint directory to measure (step_N, or a "
                                "directory of them)")
        from trainer.state.run import resolve_checkpoint

        ckpt = resolve_checkpoint(resume)
        cfg = run_config(ckpt, [a for a in overrides if not a.startswith("trainer.resume=")])
        candidates = load_candidates(names, cand_kv, cfg.seq_len)
        for name, c in candidates.items():
            for own in dict.fromkeys(cfg.patterns()):
                check_subset(c, own, cfg.seq_len, name)
        torch.manual_seed(cfg.seed)
        model = load_model(cfg, ckpt)
    except (CoverageError, ConfigError, DataConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    result = measure(model, eval_batches(cfg), candidates, cfg.parallel.backend)
    print(format_table(result))
    if out:
        Path(out).write_text(json.dumps(result, indent=1))
    return result


def cli() -> None:
    """``python -m trainer.coverage``."""
    main(sys.argv[1:])


if __name__ == "__main__":
    cli()
