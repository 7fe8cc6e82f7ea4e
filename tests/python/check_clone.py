#!/usr/bin/env python3
"""Check with Hugging Face transformers that DST is a function-preserving HyperClone of SRC.

    python check_clone.py SRC DST [--n N] [--ffn-factor M] [--text "..."] [--tokens 1,2,3] [--json]

Both folders are loaded independently by `AutoModelForCausalLM.from_pretrained` in float64
with eager attention on the CPU, so this checks the written checkpoint exactly as a user
would load it (docs/hypercloning.md, invariants 1, 2, 5 and 6). Reported:

  * max |logits_D - logits_S|, and that over max |logits_S|
  * std(logits_D) / std(logits_S): catches a global 1/n scale that argmax checks miss
  * top-1 agreement
  * for every hidden state i (embedding output, each block, final norm): the deviation of
    DST's state from the n-fold block tile [h_S; h_S; ...] (concatenation, not interleave)
  * DST's config against SRC's: hidden n*d, heads n*H, kv heads n*K (1 stays 1), FFN a
    multiple of SRC's (exactly m*f with --ffn-factor), everything else unchanged, untied.

Tolerances. Everything runs in float64, but transformers' eager attention computes the
softmax in float32 even then, so identical functions agree to ~1e-7 relative, not 1e-12.
  * logits: max abs diff <= 1e-4.
  * hidden states: max abs deviation <= 1e-4 * max(1, max |h_S|) per state. Relative,
    because the float32-softmax error is proportional to the activations, and real
    checkpoints have residual outlier dimensions in the hundreds (SmolLM2-135M) where a
    fixed 1e-4 is below float32 resolution; max(1, .) keeps it absolute for small states.
  * |std ratio - 1| <= 1e-5.
Exit status 0 on PASS, 1 on FAIL (2 for usage errors). The functions are imported by the
pytest suite, which loads each source once and runs many clones against it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

LOGIT_ATOL = 1e-4
HIDDEN_RTOL = 1e-4
STD_RTOL = 1e-5
DEFAULT_TOKENS = 16
DEFAULT_SEED = 0

# Config fields that cloning must leave alone (compared after transformers normalised both
# configs, so a 4.x-style rope_theta and a 5.x rope_parameters compare equal).
UNCHANGED_FIELDS = (
    "model_type",
    "num_hidden_layers",
    "vocab_size",
    "rms_norm_eps",
    "max_position_embeddings",
    "rope_parameters",
    "rope_theta",
    "rope_scaling",
    "hidden_act",
    "attention_bias",
    "mlp_bias",
    "sliding_window",
    "use_sliding_window",
    # Mixture of Experts: the expert count, top-k and routing are kept; so are OLMoE's clip
    # and Qwen-MoE's layer layout and q/k/v bias switch.
    "num_local_experts",
    "num_experts",
    "num_experts_per_tok",
    "norm_topk_prob",
    "decoder_sparse_step",
    "mlp_only_layers",
    "qkv_bias",
    "clip_qkv",
    "bos_token_id",
    "eos_token_id",
)


@dataclass
class Outputs:
    logits: torch.Tensor  # f64 [1, T, V]
    hidden: list[torch.Tensor] = field(default_factory=list)  # L+1 x f64 [1, T, d]


def head_dim(cfg) -> int:
    # Explicit head_dim wins (Qwen3 uses head_dim != hidden/heads); else the classic rule.
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def ffn_size(cfg) -> int:
    # Families name the MLP width differently: intermediate_size, GPT-2's n_inner (None
    # means 4 * hidden), OPT's ffn_dim; Qwen-MoE's experts are moe_intermediate_size wide
    # (its intermediate_size is the width of dense layers, which it does not have here).
    for key in ("moe_intermediate_size", "intermediate_size", "ffn_dim"):
        v = getattr(cfg, key, None)
        if v:
            return v
    return getattr(cfg, "n_inner", None) or 4 * cfg.hidden_size


def kv_heads(cfg) -> int:
    return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


def load_model(path: str | Path):
    from transformers import AutoModelForCausalLM

    # A Mixture of Experts runs its experts' eager loop: the default grouped_mm takes no float64.
    cfg = json.loads((Path(path) / "config.json").read_text())
    moe = any(k in cfg for k in ("num_local_experts", "num_experts"))
    kw = {"experts_implementation": "eager"} if moe else {}
    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float64, attn_implementation="eager", **kw
    ).eval()


def default_ids(vocab_size: int, n_tokens: int = DEFAULT_TOKENS, seed: int = DEFAULT_SEED):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (1, n_tokens), generator=g, dtype=torch.int64)


def text_ids(src: str | Path, text: str) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src))
    return torch.tensor([tok(text)["input_ids"]], dtype=torch.int64)


@torch.no_grad()
def forward(model, ids: torch.Tensor) -> Outputs:
    out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    return Outputs(
        logits=out.logits.to(torch.float64),
        hidden=[h.to(torch.float64) for h in out.hidden_states],
    )


@dataclass
class Growth:
    """What a clone grew beyond the paper's uniform width (docs/growth.md); the defaults
    are the paper's growth."""

    ffn: int | None = None  # exact destination FFN width (Net2Net when not a multiple)
    heads: int | None = None  # destination query heads when not n x the source's
    layer_of: list[int] | None = None  # for each DST layer, the SRC layer it equals
    keep_tied: bool = False  # the residual is carried as tile(h) * s, the head stays tied
    residual_scale: float | None = None  # s with keep_tied; None: from the source's family


# Families whose model multiplies embeddings by sqrt(hidden_size) (transformers' Gemma
# ScaledWordEmbedding), a multiplier that grows by sqrt(n) with the width.
EMBEDDING_TIMES_SQRT_HIDDEN = ("gemma", "gemma2", "gemma3_text")


def tied_residual_scale(cfg_s, n: int) -> float:
    """docs/growth.md: with a kept tie the head is the embedding, so the embedding must be
    tile(E)/n for exact logits; the stream starts as embedding x multiplier, so s = 1/n, or
    sqrt(n)/n where the multiplier sqrt(hidden_size) grows by sqrt(n). Norm eps scales by s^2."""
    if cfg_s.model_type in EMBEDDING_TIMES_SQRT_HIDDEN:
        return math.sqrt(n) / n
    return 1 / n


def identity_layer_map(layers: int, target: int) -> list[int]:
    """LLaMA Pro's even spread, written independently of the Rust code: after source layer
    i, floor((i+1)*added/L) - floor(i*added/L) copies of it."""
    added = target - layers
    out = []
    for i in range(layers):
        out += [i] * (1 + (i + 1) * added // layers - i * added // layers)
    return out


def check_config(cfg_s, cfg_d, n: int, m: int | None = None, growth: Growth | None = None) -> list[str]:
    """Return a list of violations of invariant 5 (empty when DST's config is right)."""
    errs = []
    g = growth or Growth()

    def want(what, got, expected):
        if got != expected:
            errs.append(f"{what}: got {got!r}, expected {expected!r}")

    want("hidden_size", cfg_d.hidden_size, n * cfg_s.hidden_size)
    h, k = cfg_s.num_attention_heads, kv_heads(cfg_s)
    heads = g.heads if g.heads is not None else n * h
    want("num_attention_heads", cfg_d.num_attention_heads, heads)
    # Query heads keep their kv groups: K' = H' / (H / K); a single MQA kv head stays single.
    want("num_key_value_heads", kv_heads(cfg_d), 1 if k == 1 else heads // (h // k))
    want("head_dim", head_dim(cfg_d), head_dim(cfg_s))
    f_s, f_d = ffn_size(cfg_s), ffn_size(cfg_d)
    if g.ffn is not None:
        want("intermediate_size", f_d, g.ffn)
    elif m is not None:
        want("intermediate_size", f_d, m * f_s)
    elif f_d % f_s or f_d < f_s:
        errs.append(f"intermediate_size: {f_d} is not a multiple of {f_s}")
    shared = getattr(cfg_s, "shared_expert_intermediate_size", None)
    if shared:
        # Qwen2-MoE's shared expert: whole copies, the floor of the experts' FFN ratio.
        want("shared_expert_intermediate_size", cfg_d.shared_expert_intermediate_size, (f_d // f_s) * shared)
    changed = set()
    if g.keep_tied:
        # The head stays the embedding; norms see tile(h) * s, exact with eps * s^2 (eps / n^2,
        # eps / n where the embedding multiplier grows by sqrt(n)).
        want("tie_word_embeddings", bool(getattr(cfg_d, "tie_word_embeddings", False)), True)
        divisor = n if cfg_s.model_type in EMBEDDING_TIMES_SQRT_HIDDEN else n**2
        for key in ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"):
            if getattr(cfg_s, key, None) is not None:
                want(key, getattr(cfg_d, key, None), getattr(cfg_s, key) / divisor)
                changed.add(key)
    else:
        # A tied head cannot be a plain tile (embedding wants no 1/n, head wants 1/n).
        want("tie_word_embeddings", bool(getattr(cfg_d, "tie_word_embeddings", False)), False)
    if g.layer_of is not None:
        want("num_hidden_layers", cfg_d.num_hidden_layers, len(g.layer_of))
        changed.add("num_hidden_layers")
        types = getattr(cfg_s, "layer_types", None)
        if types is not None:
            want("layer_types", list(cfg_d.layer_types), [types[i] for i in g.layer_of])
    missing = object()
    for key in UNCHANGED_FIELDS:
        if key in changed:
            continue
        a, b = getattr(cfg_s, key, missing), getattr(cfg_d, key, missing)
        if a is not missing or b is not missing:
            want(key, None if b is missing else b, None if a is missing else a)
    return errs


def compare(
    out_s: Outputs,
    out_d: Outputs,
    n: int,
    logit_atol: float = LOGIT_ATOL,
    hidden_rtol: float = HIDDEN_RTOL,
    std_rtol: float = STD_RTOL,
    growth: Growth | None = None,
) -> dict:
    """Numbers of invariants 1 and 2, and whether they pass the given tolerances.

    With depth growth, DST's state i+1 (after layer i) is compared with SRC's state after
    the layer DST's layer i equals; with a kept tie, residual states are tile(h) * s (the
    last state is the final norm's output, scale-invariant, so a plain tile)."""
    g = growth or Growth()
    ls, ld = out_s.logits, out_d.logits
    problems = []
    if ls.shape != ld.shape:
        return {"pass": False, "problems": [f"logit shapes differ: {tuple(ls.shape)} vs {tuple(ld.shape)}"]}
    diff = (ld - ls).abs().max().item()
    scale = ls.abs().max().item()
    std_ratio = (ld.std() / ls.std()).item()
    top1 = (ld.argmax(-1) == ls.argmax(-1)).double().mean().item()
    if not diff <= logit_atol:  # `not <=` so that NaN fails
        problems.append(f"max |logit diff| {diff:.3e} > {logit_atol:.0e}")
    if not abs(std_ratio - 1) <= std_rtol:
        problems.append(f"logit std ratio {std_ratio:.9f} is not 1 +- {std_rtol:.0e}")

    hidden = []
    layer_of = g.layer_of if g.layer_of is not None else list(range(len(out_s.hidden) - 1))
    src_state = [0] + [l + 1 for l in layer_of]
    if len(out_d.hidden) != len(src_state):
        problems.append(f"{len(out_d.hidden)} hidden states, expected {len(src_state)}")
    last = len(src_state) - 1
    for i, hd in enumerate(out_d.hidden[: len(src_state)]):
        if i < last and src_state[i] == len(out_s.hidden) - 1:
            # Identity blocks after the last source layer: transformers reports SRC's last
            # state after the final norm only, so there is nothing unnormed to compare with
            # (the final state and the logits still are compared).
            continue
        hs = out_s.hidden[src_state[i]]
        s = g.residual_scale if g.residual_scale is not None else 1 / n
        scale = s if g.keep_tied and i < last else 1.0
        # OPT with project_out returns its last state in the ungrown word_embed_proj_dim
        # space: a state as wide as the source's must equal it (a 1-fold tile).
        # (Residual-stream states cannot stay narrow: the grown config fixes their width.)
        copies = 1 if hd.shape[-1] == hs.shape[-1] else n
        tiled = torch.cat([hs] * copies, dim=-1) * scale
        if tiled.shape != hd.shape:
            problems.append(f"hidden[{i}] shape {tuple(hd.shape)}, expected {tuple(tiled.shape)}")
            hidden.append({"i": i, "abs": math.inf, "rel": math.inf})
            continue
        dev = (hd - tiled).abs().max().item() / scale
        rel = dev / max(1.0, hs.abs().max().item())
        hidden.append({"i": i, "abs": dev, "rel": rel, "max_abs_src": hs.abs().max().item()})
        if not rel <= hidden_rtol:
            problems.append(f"hidden[{i}] deviates from the {n}-fold tile by {dev:.3e} (rel {rel:.3e} > {hidden_rtol:.0e})")

    return {
        "pass": not problems,
        "problems": problems,
        "max_abs_logit_diff": diff,
        "max_rel_logit_diff": diff / scale if scale else math.inf,
        "max_abs_logit_src": scale,
        "std_ratio": std_ratio,
        "top1_agreement": top1,
        "hidden": hidden,
        "tolerances": {"logit_atol": logit_atol, "hidden_rtol": hidden_rtol, "std_rtol": std_rtol},
    }


def factor_from_configs(cfg_s, cfg_d, n: int | None) -> int:
    if cfg_d.hidden_size % cfg_s.hidden_size:
        raise ValueError(f"DST hidden {cfg_d.hidden_size} is not a multiple of SRC hidden {cfg_s.hidden_size}")
    derived = cfg_d.hidden_size // cfg_s.hidden_size
    if n is not None and n != derived:
        raise ValueError(f"--n {n} but the configs say {derived} ({cfg_d.hidden_size}/{cfg_s.hidden_size})")
    return derived


def check(src, dst, n=None, m=None, ids=None, model_s=None, out_s=None, growth=None, heads=None, **tol) -> dict:
    """Full check of one clone; pass model_s/out_s to reuse an already loaded source."""
    model_s = model_s if model_s is not None else load_model(src)
    model_d = load_model(dst)
    cfg_s, cfg_d = model_s.config, model_d.config
    n = factor_from_configs(cfg_s, cfg_d, n)
    if ids is None:
        ids = default_ids(cfg_s.vocab_size)
    out_s = out_s if out_s is not None else forward(model_s, ids)
    if heads is not None:
        growth = Growth(heads=heads)
    if growth is not None and growth.keep_tied and growth.residual_scale is None:
        growth = dataclasses.replace(growth, residual_scale=tied_residual_scale(cfg_s, n))
    report = compare(out_s, forward(model_d, ids), n, growth=growth, **tol)
    cfg_errs = check_config(cfg_s, cfg_d, n, m, growth)
    report["problems"] = cfg_errs + report["problems"]
    report["pass"] = report["pass"] and not cfg_errs
    report.update(src=str(src), dst=str(dst), n=n, n_tokens=ids.shape[1])
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--n", type=int, help="expected width factor (default: from the configs)")
    ap.add_argument("--ffn-factor", type=int, help="expected FFN factor m (default: any multiple)")
    src_in = ap.add_mutually_exclusive_group()
    src_in.add_argument("--text", help="tokenize this with SRC's tokenizer")
    src_in.add_argument("--tokens", help="comma-separated token ids")
    ap.add_argument("--n-tokens", type=int, default=DEFAULT_TOKENS, help="random ids when neither --text nor --tokens")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)

    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

    ids = None
    if args.text is not None:
        ids = text_ids(args.src, args.text)
    elif args.tokens is not None:
        ids = torch.tensor([[int(t) for t in args.tokens.split(",")]], dtype=torch.int64)
    model_s = load_model(args.src)
    if ids is None:
        ids = default_ids(model_s.config.vocab_size, args.n_tokens, args.seed)
    try:
        report = check(args.src, args.dst, args.n, args.ffn_factor, ids, model_s=model_s)
    except ValueError as e:
        report = {"pass": False, "problems": [str(e)], "src": args.src, "dst": args.dst}

    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report))
    return 0 if report["pass"] else 1


def format_report(r: dict) -> str:
    lines = [f"{r['src']} -> {r['dst']}"]
    if "std_ratio" in r:
        lines += [
            f"  n = {r['n']}, {r['n_tokens']} tokens",
            f"  max |logit diff|      {r['max_abs_logit_diff']:.3e}  (rel {r['max_rel_logit_diff']:.3e} of {r['max_abs_logit_src']:.3g})",
            f"  logit std ratio       {r['std_ratio']:.12f}",
            f"  top-1 agreement       {r['top1_agreement']:.3f}",
        ]
        for h in r["hidden"]:
            lines.append(f"  hidden[{h['i']:2d}] vs tile   {h['abs']:.3e}  (rel {h['rel']:.3e})")
    lines += [f"  FAIL: {p}" for p in r["problems"]]
    lines.append("PASS" if r["pass"] else "FAIL")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
