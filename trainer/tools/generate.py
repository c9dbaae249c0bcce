"""Sample from a trained checkpoint: ``python -m trainer.generate trainer.resume=CKPT prompt="..." max_new_tokens=N``.

The user gives only the checkpoint (a ``step_*`` directory, or a directory of them: its newest
intact one; or a run directory). ``trainer.state.run.load_run`` reads the run's config, model and
tokenizer from it, at any ZeRO stage, with strict keys and ``weights_only`` loading.

Greedy by default (``temperature=0``); ``temperature``, ``top_k``, ``top_p`` and ``seed`` sample.
The prompt is prefilled with the training kernels, then one token at a time over a per-layer KV
cache chosen from the pattern (model/decode.py: bounded patterns keep globals + a ring buffer).
Learned global slots (model.n_learned_global = g) come first: the prompt starts at position g, after
g separator tokens whose embeddings the model replaces; an empty prompt is one separator (DOC_SEP,
what precedes every document in training). A model trained with packed documents
(data.document_mask / data.reset_positions) decodes with them: the prompt is then a new document. Positions are absolute: a prompt plus generation longer
than the trained seq_len is allowed, with a note on stderr, since windows apply as they are and
rotary angles extrapolate (model/decode.py). A bidirectional (objective=mlm) checkpoint is refused.

Prints the prompt and its continuation, then one line: tokens/s and the cache's bytes.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from model.decode import Documents, Sampling, generate
from model.pattern.ranges import SEED, SIZE, Bounds
from trainer.config.validate import ConfigError, TrainConfig, check_kernel_environment, to_dataclass
from trainer.data.corpus import DOC_SEP, DataConfigError
from trainer.state import run

CONF = Path(__file__).resolve().parents[2] / "conf"


@dataclass
class ResumeSection:
    resume: str = "none"


@dataclass
class GenerateConfig:
    trainer: ResumeSection = field(default_factory=ResumeSection)
    prompt: str = ""
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    backend: str = "auto"
    device: str = "auto"
    format: str = "text"

    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_k, self.top_p, self.seed)


# The range of every numeric key of GenerateConfig (tests/test_schema_ranges.py: none without one).
RANGES = {"max_new_tokens": SIZE, "temperature": Bounds(0, note="0 = greedy"), "top_k": Bounds(0, note="0 = no limit"),
          "top_p": Bounds(0, 1, lo_open=True), "seed": SEED}


def load_generate_config(dcfg: DictConfig) -> GenerateConfig:
    """The checked GenerateConfig (ConfigError: one line naming the setting)."""
    from kernels import BACKENDS

    node = OmegaConf.to_container(dcfg, resolve=True)
    node.pop("hydra", None)
    cfg = to_dataclass(GenerateConfig, node)
    if cfg.trainer.resume in ("none", "auto", ""):
        raise ConfigError(f"trainer.resume: give the checkpoint to sample from (a step_* directory or a directory "
                          f"of them); got {cfg.trainer.resume!r}")
    for key, bounds in RANGES.items():
        bounds.check(key, getattr(cfg, key), ConfigError)
    if cfg.backend not in BACKENDS:
        raise ConfigError(f"backend: must be one of {', '.join(BACKENDS)}; got {cfg.backend!r}")
    if cfg.format not in ("text", "json"):
        raise ConfigError(f"format: must be one of text, json; got {cfg.format!r}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device: must be one of auto, cpu, cuda; got {cfg.device!r}")
    try:
        cfg.sampling().validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_kernel_environment()
    return cfg


# --- the checkpoint -----------------------------------------------------------------------------------

def run_config(ckpt: Path) -> TrainConfig:
    """The training config of the run that wrote ``ckpt`` (trainer.state.run), refused unless it decodes
    left to right."""
    cfg = run.run_config(ckpt)
    if getattr(cfg, "objective", "clm") != "clm" or not all(p.causal for p in cfg.patterns()):
        raise ConfigError(f"attention.causal: {ckpt} was trained bidirectionally (objective="
                          f"{getattr(cfg, 'objective', 'clm')}); generation decodes left to right and needs "
                          "causal patterns (objective=clm)")
    return cfg


def documents_of(cfg: TrainConfig) -> Documents | None:
    """The packed-document settings the model was trained with (data.document_mask / reset_positions)."""
    mask = cfg.data.document_mask
    reset = cfg.data.resets_positions
    return Documents(DOC_SEP, mask, reset) if mask or reset else None


def prompt_tokens(text: str, tokenizer, n_slots: int) -> torch.Tensor:
    """[1, P]: ``n_slots`` separators (the learned global slots), then the prompt (or one separator)."""
    ids = [int(i) for i in tokenizer.encode(text)] or [DOC_SEP]
    return torch.tensor([[DOC_SEP] * n_slots + ids], dtype=torch.long)


# --- the command ------------------------------------------------------------------------------------

@hydra.main(config_path=str(CONF), config_name="generate", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    from trainer.engine import set_environment
    from trainer.state.faults import config_error

    set_environment()
    try:
        cfg = load_generate_config(dcfg)
        ckpt = run.resolve_checkpoint(cfg.trainer.resume)
        device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                              "cpu" if cfg.device == "auto" else cfg.device)
        train_cfg, model, tok = run.load_run(ckpt, device, run_config(ckpt))
    except (ConfigError, DataConfigError) as e:
        config_error(str(e).splitlines()[0], None)
    g = model.cfg.n_learned_global
    tokens = prompt_tokens(cfg.prompt, tok, g).to(device)
    total = tokens.shape[1] + cfg.max_new_tokens
    if total > train_cfg.seq_len:
        print(f"note: prompt + max_new_tokens = {total} positions > the trained seq_len={train_cfg.seq_len}: the "
              "patterns apply as they are and rotary angles extrapolate to positions never trained on",
              file=sys.stderr)
    out = generate(model, tokens, cfg.max_new_tokens, cfg.sampling(), backend=cfg.backend,
                   documents=documents_of(train_cfg))
    rate = (cfg.max_new_tokens - 1) / out.decode_s if cfg.max_new_tokens > 1 else float("nan")
    if cfg.format == "json":  # one object per prompt: machine-readable, nothing else on stdout
        new = out.tokens[0, tokens.shape[1]:].tolist()
        print(json.dumps({"prompt_ids": tokens[0, g:].tolist(), "ids": new, "text": tok.decode(new),
                          "tokens_per_s": rate if rate == rate else None, "cache_bytes": out.cache_bytes}), flush=True)
        return
    print(tok.decode(out.tokens[0, g:].tolist()), flush=True)
    print(f"[{ckpt}] {cfg.max_new_tokens} tokens, {rate:,.1f} tokens/s decoding (prefill {tokens.shape[1]} tokens "
          f"in {out.prefill_s:.3f} s); KV cache {out.cache_bytes:,} bytes ({out.cache})", file=sys.stderr)


def _preflight(argv: list[str]) -> str | None:
    """A composition error (unknown key, bad override) of conf/generate.yaml as one line; None if it composes."""
    from trainer.config.compose import composition_error

    return composition_error(argv, "generate")


def cli() -> None:
    """``python -m trainer.generate``: composition errors in one line, then the Hydra command."""
    if (problem := _preflight(sys.argv[1:])) is not None:
        print(f"config error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    cli()
