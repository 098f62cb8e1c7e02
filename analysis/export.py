"""Export a run's checkpoints to Hugging Face `transformers` and to TransformerLens.

    uv run python -m analysis.export RUN_DIR --to hf --out DIR [--step N | --all] [--layout native|gpt2|neox]
    uv run python -m analysis.export RUN_DIR --to transformer_lens --out DIR [--step N | --all]

Without --step or --all the newest checkpoint with weights is exported into DIR; with --all every
checkpoint goes into DIR/step_NNNNNNN/, so that a run becomes a checkpoint series that
`python -m analysis.series DIR` reads.

Formats (each exact: same logits as `train.core.model.AttnOnlyTransformer`, up to float rounding):

* `--to hf --layout native` (default): the project's own `transformers` model type
  (train/core/hf_model.py), with its code written into the export: `AutoModelForCausalLM.
  from_pretrained(DIR, trust_remote_code=True)` loads it without this project installed. Every
  model variant can be exported this way.
* `--to hf --layout gpt2`: `GPT2LMHeadModel` with zeroed MLPs, for learned positions with
  LayerNorm and d_model = n_heads * d_head; `--layout neox`: `GPTNeoXForCausalLM` (sequential
  residual, full rotary, zeroed MLPs) for rotary positions under the same conditions. Neither
  has an output bias: b_U is folded into the final LayerNorm's bias (b' = b + c with c W_U = b_U,
  least squares), which is exact only when b_U lies in the row space of W_U; otherwise, as for
  any other model these layouts cannot express, the export stops with a one-line reason.
* `--to transformer_lens`: `model.safetensors` with TransformerLens 3.x state-dict names
  (`embed.W_E`, `pos_embed.W_pos`, `blocks.{l}.ln1.w`, `blocks.{l}.attn.W_Q`, `unembed.W_U`,
  ...) and `hooked_transformer_config.json`, the keyword arguments of HookedTransformerConfig
  (attention-only; standard, shortformer or rotary positions; output bias). Smeared keys have no
  TransformerLens equivalent and are refused.

Every export also holds `induction_tracker.json` (step, tokens, the run's probe settings) and
`probes.safetensors`: the run's exact probe token ids (`repeated`, `copy_tokens`, `heldout`, and
`allowed`, the tokens its random probes draw from), which `analysis.series --probes` takes. Token
ids are the run's own; a text run's tokenizer is read as data and saved again through its library
(`write_tokenizer`), so nothing of the run directory is copied as it is (no planted code, no link
followed). Checkpoints with non-finite weights are refused.

The export is built in a temporary directory beside --out and moved in when complete
(train/core/outputs.py): --out must be new, empty or an earlier export (whose files are then
replaced), or --force writes into another directory beside its files; never a run or a part of
one, a file or a link.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import inspect
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from train.core import edge, hf_model, outputs, rundir
from train.core import model as model_module
from train.core.config import POSITIONAL_SCHEMES, ModelConfig
from train.core.model import AttnOnlyTransformer, model_kwargs
from train.core.probes import PROBES_FILE, write_probe_file
from train.core.runs import Checkpoint, Run, RunError, open_run

TARGETS = ("hf", "transformer_lens")
LAYOUTS = ("native", "gpt2", "neox")
INFO_FILE = "induction_tracker.json"
TL_CONFIG_FILE = "hooked_transformer_config.json"
MODELING_FILE = "modeling_induction_tracker.py"  # train/core/hf_model.py, as copied into an export
FOLD_TOLERANCE = 1e-5  # largest |c W_U - b_U| accepted when folding b_U into the final LayerNorm


class ExportError(ValueError):
    """A model or request the export cannot serve: one line, no traceback."""


# -- probes -------------------------------------------------------------------------------------
def probe_file(run: Run) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The run's probe token ids (Run.probes: as training built them) and the settings the scores
    use: (tensors repeated / copy_tokens / heldout / allowed [/ heldout_mixture], settings period /
    repeats / icl_early / icl_late [/ n_previous_token, when the run scored previous-token
    attention]). `allowed`: the tokens random probes draw from (Probes.allowed), for robustness
    probes built like the run's; `heldout_mixture`: held-out sequences with the training
    repetition, when the run has them."""
    from train.core.metrics import icl_indices

    cfg, probes = run.saved_config(), run.probes()
    callbacks = cfg.get("callbacks") or {}
    attention, heldout = callbacks.get("attention") or {}, callbacks.get("heldout") or {}
    early, late = icl_indices(probes.heldout.shape[1], heldout.get("icl_early", cfg.probes.icl_early),
                              heldout.get("icl_late", cfg.probes.icl_late))
    settings = dict(period=probes.period, repeats=probes.repeats, icl_early=early, icl_late=late)
    if "n_heldout" in attention:  # the previous-token score's held-out sequences (null: all of them)
        settings["n_previous_token"] = int(attention["n_heldout"] or probes.heldout.shape[0])
    tensors = dict(repeated=probes.repeated, copy_tokens=probes.copy_tokens, heldout=probes.heldout,
                   allowed=probes.allowed)
    if probes.heldout_mixture is not None:
        tensors["heldout_mixture"] = probes.heldout_mixture
    return tensors, settings


# -- the project's own transformers model type ---------------------------------------------------
def model_source() -> str:
    """train/core/model.py with its imports from train.core.config replaced by their values, so that the
    export's copy needs only torch."""
    src = Path(inspect.getfile(model_module)).read_text(encoding="utf-8")
    defaults = "".join(f"    {f.name} = {f.default!r}\n" for f in dataclasses.fields(ModelConfig)
                       if not f.name.startswith("_") and isinstance(f.default, (int, float, str, bool)))
    replacements = {
        "from train.core.config import POSITIONAL_SCHEMES\n": f"POSITIONAL_SCHEMES = {POSITIONAL_SCHEMES!r}\n",
        "from train.core.config import ModelConfig as _Defaults\n": f"\n\nclass _Defaults:  # train/core/config.py ModelConfig\n{defaults}",
    }
    for old, new in replacements.items():
        if old not in src:
            raise RuntimeError(f"train/core/model.py no longer has the line {old.strip()!r}; update analysis/export.py")
        src = src.replace(old, new)
    return src


def native_model(model: AttnOnlyTransformer, kwargs: dict[str, Any]):
    from train.core.hf_model import AttnOnlyConfig, AttnOnlyForCausalLM

    config = AttnOnlyConfig(**kwargs, bos_token_id=0)
    config.auto_map = {"AutoConfig": f"{MODELING_FILE[:-3]}.AttnOnlyConfig",
                       "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.AttnOnlyForCausalLM"}
    hf = AttnOnlyForCausalLM(config)
    hf.model.load_state_dict(model.state_dict())
    return hf.eval()


def write_modeling_code(out: Path) -> None:
    shutil.copyfile(inspect.getfile(hf_model), out / MODELING_FILE)
    (out / "model.py").write_text(model_source(), encoding="utf-8")


# -- standard layouts ------------------------------------------------------------------------------
def _check_standard(model: AttnOnlyTransformer, layout: str) -> None:
    wanted = "learned" if layout == "gpt2" else "rotary"
    reasons = []
    if model.positional != wanted:
        reasons.append(f"it has {model.positional} positions ({layout} has {wanted})")
    if not model.layernorm:
        reasons.append(f"it has no LayerNorm ({layout} always normalises)")
    if model.n_layers and model.blocks[0].attn.smear is not None:
        reasons.append("it has smeared keys")
    if model.d_model != model.n_heads * model.d_head:
        reasons.append(f"d_model={model.d_model} differs from n_heads * d_head={model.n_heads * model.d_head}")
    if reasons:
        raise ExportError(f"the model cannot be expressed exactly as {layout}: {'; '.join(reasons)}; "
                          f"use --layout native")


def folded_final_bias(model: AttnOnlyTransformer, layout: str) -> torch.Tensor:
    """The final LayerNorm bias b + c with c W_U = b_U (see the module docstring)."""
    w_u, b_u = model.W_U.detach().double(), model.b_U.detach().double()
    bias = model.ln_final.bias.detach().double()
    if not b_u.any():
        return bias.float()
    c = torch.linalg.lstsq(w_u.T, b_u[:, None]).solution[:, 0]
    error = (c @ w_u - b_u).abs().max().item()
    if error > FOLD_TOLERANCE:
        raise ExportError(f"the model cannot be expressed exactly as {layout}: its output bias b_U is not "
                          f"reachable through W_U (d_model={model.d_model} < d_vocab={model.d_vocab}; "
                          f"residual {error:.2g}); use --layout native")
    return (bias + c).float()


def _stacked(w: torch.Tensor) -> torch.Tensor:
    """[n_heads, d_model, d_head] -> [d_model, n_heads * d_head] (head-major columns)."""
    return w.transpose(0, 1).reshape(w.shape[1], -1)


def gpt2_model(model: AttnOnlyTransformer, kwargs: dict[str, Any]):
    from transformers import GPT2Config, GPT2LMHeadModel

    _check_standard(model, "gpt2")
    config = GPT2Config(vocab_size=model.d_vocab, n_positions=model.n_ctx, n_embd=model.d_model,
                        n_layer=model.n_layers, n_head=model.n_heads, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, layer_norm_epsilon=model.ln_final.eps, tie_word_embeddings=False,
                        bos_token_id=0, eos_token_id=0)
    hf = GPT2LMHeadModel(config)
    sd = {k: torch.zeros_like(v) for k, v in hf.state_dict().items()}
    sd |= {k: torch.ones_like(v) for k, v in sd.items() if re.search(r"ln_2\.weight$", k)}
    sd["transformer.wte.weight"], sd["transformer.wpe.weight"] = model.W_E, model.W_pos
    for l, block in enumerate(model.blocks):
        a, p = block.attn, f"transformer.h.{l}."
        sd[p + "ln_1.weight"], sd[p + "ln_1.bias"] = block.ln1.weight, block.ln1.bias
        sd[p + "attn.c_attn.weight"] = torch.cat([_stacked(a.W_Q), _stacked(a.W_K), _stacked(a.W_V)], dim=1)
        sd[p + "attn.c_attn.bias"] = torch.cat([a.b_Q.flatten(), a.b_K.flatten(), a.b_V.flatten()])
        sd[p + "attn.c_proj.weight"], sd[p + "attn.c_proj.bias"] = a.W_O.reshape(-1, model.d_model), a.b_O
    sd["transformer.ln_f.weight"] = model.ln_final.weight
    sd["transformer.ln_f.bias"] = folded_final_bias(model, "gpt2")
    sd["lm_head.weight"] = model.W_U.T
    hf.load_state_dict({k: v.detach().clone().contiguous() for k, v in sd.items()})
    return hf.eval()


def neox_model(model: AttnOnlyTransformer, kwargs: dict[str, Any]):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    _check_standard(model, "neox")
    config = GPTNeoXConfig(vocab_size=model.d_vocab, max_position_embeddings=model.n_ctx, hidden_size=model.d_model,
                           num_hidden_layers=model.n_layers, num_attention_heads=model.n_heads,
                           intermediate_size=4 * model.d_model, use_parallel_residual=False,
                           rope_parameters={"rope_type": "default", "rope_theta": kwargs.get("rotary_base", ModelConfig.rotary_base),
                                            "partial_rotary_factor": 1.0},
                           layer_norm_eps=model.ln_final.eps, attention_dropout=0.0, hidden_dropout=0.0,
                           tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    hf = GPTNeoXForCausalLM(config)
    sd = {k: torch.zeros_like(v) for k, v in hf.state_dict().items() if not k.endswith("inv_freq")}
    sd |= {k: torch.ones_like(v) for k, v in sd.items() if re.search(r"post_attention_layernorm\.weight$", k)}
    sd["gpt_neox.embed_in.weight"] = model.W_E
    h, e, d = model.n_heads, model.d_head, model.d_model
    for l, block in enumerate(model.blocks):
        a, p = block.attn, f"gpt_neox.layers.{l}."
        sd[p + "input_layernorm.weight"], sd[p + "input_layernorm.bias"] = block.ln1.weight, block.ln1.bias
        # Output rows per head: [q_h, k_h, v_h], each d_head rows of a [out, in] Linear weight.
        qkv = torch.stack([a.W_Q, a.W_K, a.W_V], dim=1)  # [h, 3, d, e]
        sd[p + "attention.query_key_value.weight"] = qkv.permute(0, 1, 3, 2).reshape(3 * h * e, d)
        sd[p + "attention.query_key_value.bias"] = torch.stack([a.b_Q, a.b_K, a.b_V], dim=1).reshape(-1)
        sd[p + "attention.dense.weight"], sd[p + "attention.dense.bias"] = a.W_O.reshape(h * e, d).T, a.b_O
    sd["gpt_neox.final_layer_norm.weight"] = model.ln_final.weight
    sd["gpt_neox.final_layer_norm.bias"] = folded_final_bias(model, "neox")
    sd["lm_head.weight" if "lm_head.weight" in sd else "embed_out.weight"] = model.W_U.T  # named so before transformers 5
    hf.load_state_dict({k: v.detach().clone().contiguous() for k, v in sd.items()}, strict=False)
    missing = [k for k in hf.state_dict() if k not in sd and not k.endswith("inv_freq")]
    if missing:
        raise RuntimeError(f"GPTNeoXForCausalLM has weights the export does not set: {missing}")
    return hf.eval()


# -- TransformerLens ---------------------------------------------------------------------------
def transformer_lens_state(model: AttnOnlyTransformer, kwargs: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict with TransformerLens names, HookedTransformerConfig keyword arguments)."""
    if model.n_layers and model.blocks[0].attn.smear is not None:
        raise ExportError("the model has smeared keys, which TransformerLens cannot express; "
                          "use --to hf (native layout)")
    sd = {"embed.W_E": model.W_E, "unembed.W_U": model.W_U, "unembed.b_U": model.b_U}
    if model.W_pos is not None:
        sd["pos_embed.W_pos"] = model.W_pos
    for l, block in enumerate(model.blocks):
        for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"):
            sd[f"blocks.{l}.attn.{name}"] = getattr(block.attn, name)
        if model.layernorm:
            sd[f"blocks.{l}.ln1.w"], sd[f"blocks.{l}.ln1.b"] = block.ln1.weight, block.ln1.bias
    if model.layernorm:
        sd["ln_final.w"], sd["ln_final.b"] = model.ln_final.weight, model.ln_final.bias
    positional = {"learned": "standard"}.get(model.positional, model.positional)
    cfg = dict(n_layers=model.n_layers, d_model=model.d_model, n_ctx=model.n_ctx, d_head=model.d_head,
               n_heads=model.n_heads, d_vocab=model.d_vocab, attn_only=True, act_fn="relu", d_mlp=None,
               normalization_type="LN" if model.layernorm else None, eps=model.ln_final.eps if model.layernorm else 1e-5,
               positional_embedding_type=positional, default_prepend_bos=False, original_architecture="induction_tracker")
    if model.positional == "rotary":
        cfg |= dict(rotary_dim=model.d_head, rotary_base=kwargs.get("rotary_base", ModelConfig.rotary_base), rotary_adjacent_pairs=False)
    return {k: v.detach().float().contiguous().cpu() for k, v in sd.items()}, cfg


# -- one checkpoint ----------------------------------------------------------------------------
def check_finite(model: AttnOnlyTransformer, checkpoint: Checkpoint) -> None:
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise ExportError(f"checkpoint {checkpoint.path} has non-finite weights ({', '.join(bad[:3])}"
                          f"{', ...' if len(bad) > 3 else ''}); nothing was exported")


def write_tokenizer(run: Run, out: Path) -> None:
    """A text run's tokenizer, read as data and saved again through its library into `out`: only
    the files the library writes, never a file of the run directory's as it is (no links
    followed, no code carried)."""
    from train.core.config import ConfigError
    from train.core.text import TextTokenizer

    try:
        TextTokenizer.load(run.tokenizer_dir).save(out)
    except ConfigError as e:
        raise ExportError(str(e)) from None


@contextlib.contextmanager
def written(out: Path):
    """Writes into `out`: a failure of the file system that a library reports in its own type
    (safetensors does) becomes the OSError it is, naming `out`."""
    try:
        yield
    except (OSError, ExportError):
        raise
    except Exception as e:  # noqa: BLE001 - safetensors wraps I/O errors in its own exception type
        if "I/O error" not in str(e) and "os error" not in str(e):
            raise
        raise OSError(errno.EIO, f"write failed ({' '.join(str(e).split())})", str(out)) from None


def export_checkpoint(run: Run, checkpoint: Checkpoint, out: Path, to: str = "hf", layout: str = "native") -> Path:
    """Write a checkpoint of `run` into the directory `out` (a staging directory of export_run's)
    in format `to` (see the module docstring)."""
    model, meta = run.load_model(checkpoint)
    check_finite(model, checkpoint)
    kwargs = model_kwargs(meta["model"])
    tensors, settings = probe_file(run)
    out.mkdir(exist_ok=True)
    with written(out):
        if to == "transformer_lens":
            sd, cfg = transformer_lens_state(model, kwargs)
            save_file(sd, str(out / rundir.MODEL_FILE), metadata={"format": "pt"})
            rundir.write_json_atomic(out / TL_CONFIG_FILE, cfg)
        else:
            hf = {"native": native_model, "gpt2": gpt2_model, "neox": neox_model}[layout](model, kwargs)
            hf.save_pretrained(out)
            if layout == "native":
                write_modeling_code(out)
        write_probe_file(out / PROBES_FILE, tensors, settings)
    if run.tokenizer_dir is not None:  # text runs: beside the weights, where AutoTokenizer looks (TransformerLens: tokenizer/)
        write_tokenizer(run, out if to == "hf" else out / rundir.TOKENIZER_DIR)
    rundir.write_json_atomic(out / INFO_FILE, {"step": meta["step"], "tokens": meta.get("tokens"), "format": to,
                                               "layout": layout if to == "hf" else None,
                                               "run_model": meta["model"], "probes": settings})
    return out


def export_run(run_dir: Path, out: Path, to: str = "hf", layout: str = "native", step: int | None = None,
               all_steps: bool = False, force: bool = False, log=lambda message: None) -> list[Path]:
    """Export one checkpoint (the newest, or `step`) into `out`, or every one into out/step_N/.
    The export is built beside `out` and moved in when complete (train/core/outputs.py: `out` is
    new, empty or an export, or `force`); `log` hears of each checkpoint of --all."""
    if to not in TARGETS:
        raise ExportError(f"unknown export format {to!r}; choose one of {', '.join(TARGETS)}")
    if layout not in LAYOUTS:
        raise ExportError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if to == "transformer_lens" and layout != "native":
        raise ExportError("--layout applies to --to hf only")
    run = open_run(run_dir)
    checkpoints = run.with_weights() if all_steps else [run.checkpoint(step)]
    out = Path(out)
    with outputs.staged(out, "export", force) as stage:
        if not all_steps:
            export_checkpoint(run, checkpoints[0], stage, to, layout)
            return [out]
        for i, c in enumerate(checkpoints):
            export_checkpoint(run, c, stage / c.path.name, to, layout)
            log(f"exported step {c.step} ({i + 1}/{len(checkpoints)})")
    return [out / c.path.name for c in checkpoints]


@edge.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--to", default="hf", help=f"format: {' | '.join(TARGETS)} (default hf)")
    parser.add_argument("--out", type=Path, required=True,
                        help="output directory: new, empty or an earlier export (its files are replaced)")
    parser.add_argument("--layout", default="native", help=f"hf layout: {' | '.join(LAYOUTS)} (default native)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, help="export this step (default: the newest checkpoint)")
    which.add_argument("--all", action="store_true", help="export every checkpoint into OUT/step_NNNNNNN/")
    parser.add_argument("--force", action="store_true",
                        help="write into an existing directory that is not an export (files of the same names are "
                             "replaced, nothing else is touched)")
    args = parser.parse_args(argv)
    try:
        written = export_run(args.run_dir, args.out, args.to, args.layout, args.step, args.all, args.force,
                             log=lambda m: print(m, file=sys.stderr))
    except (ExportError, RunError, outputs.OutputError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    where = written[0] if len(written) == 1 else f"{args.out} ({len(written)} checkpoints)"
    print(f"exported {args.run_dir} ({args.to}{', ' + args.layout if args.to == 'hf' else ''}) -> {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
