"""The `shadowmerge` command line (click). Each command parses options and calls the library."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import warnings

import click

from ._version import __version__
from .errors import ShadowMergeError


from .options import FORCE_HELP, cli_options, from_cli
from .spec import ExtractSpec, GraftSpec


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C's KeyboardInterrupt so that the same cleanup runs."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum, frame):
    raise Interrupted(signum)


@contextlib.contextmanager
def _signals_interrupt():
    """SIGTERM and SIGHUP raise Interrupted while a command runs (main thread only), as SIGINT does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


class _Group(click.Group):
    """Expected errors become one line and exit 1; Ctrl-C, SIGTERM and SIGHUP exit 128+N after cleanup."""

    def parse_args(self, ctx, args):
        ctx.meta["shadowmerge.argv"] = list(args)      # the exact command, for model cards and records
        return super().parse_args(ctx, args)

    def resolve_command(self, ctx, args):
        global _ran
        name, command, rest = super().resolve_command(ctx, args)
        _ran = name
        return name, command, rest

    def invoke(self, ctx):
        try:
            with _signals_interrupt(), warnings.catch_warnings():
                # libraries' FutureWarnings (transformers, trl, mergekit) speak to their developers, not to our users
                warnings.simplefilter("ignore", FutureWarning)
                return super().invoke(ctx)
        except ShadowMergeError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt as exc:
            signum = getattr(exc, "signum", signal.SIGINT)
            kept = f"; {exc.kept}" if getattr(exc, "kept", None) else ""
            fresh_line = "\n" if sys.stderr.isatty() else ""       # a progress bar may hold the current line
            click.echo(f"{fresh_line}interrupted ({signal.Signals(signum).name}); the unfinished output was "
                       f"removed{kept}", err=True)
            sys.exit(128 + signum)
        except OSError as exc:     # the machine, not the input: a full disk, a vanished file, no permission
            where = f": {exc.filename}" if exc.filename else ""
            click.echo(f"error: {exc.strerror or exc}{where}", err=True)
            sys.exit(1)


#: commands that leave nothing running or buffered when they return: their process may skip the interpreter's
#: teardown (freeing torch's modules takes ~0.5 s, after the output is already durable and reported)
QUICK_EXIT = {"graft", "similarity", "extract", "verify"}
_ran: str | None = None


def entry() -> None:
    """The console script (and `python -m shadowmerge`): main(), then, after a QUICK_EXIT command succeeded,
    flush and leave with os._exit(0) instead of tearing the interpreter down. Library calls and tests use
    main() or the library and are unaffected."""
    try:
        main()
    except SystemExit as exc:
        if exc.code not in (0, None) or _ran not in QUICK_EXIT:
            raise
    else:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    if "logging" in sys.modules:
        sys.modules["logging"].shutdown()
    os._exit(0)


def _warn_adapter_loading() -> None:
    """After writing an adapter: one line where the installed transformers cannot load it its own way."""
    from .versions import adapter_loading_warning

    warning = adapter_loading_warning()
    if warning:
        click.echo(f"warning: {warning}", err=True)


def _command() -> str:
    """The command line this run was started with ("shadowmerge graft ..."), for the output's model card."""
    from .card import command_line

    ctx = click.get_current_context(silent=True)
    return command_line(ctx.meta.get("shadowmerge.argv") if ctx is not None else None)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="shadowmerge")
def main():
    """Shadow-FT merges: tune the Base, graft the update onto the Instruct.

    \b
    Examples:
      shadowmerge graft --instruct Qwen/Qwen3-4B --base Qwen/Qwen3-4B-Base \\
                        --tuned ./qwen3-4b-base-sft --out ./qwen3-4b-shadow
      shadowmerge graft --instruct Qwen/Qwen3-4B --lora ./qwen3-4b-base-lora --out ./qwen3-4b-shadow
      shadowmerge verify ./qwen3-4b-shadow --recompute
    """


@main.command(context_settings={"max_content_width": 100})
@cli_options(GraftSpec)
def graft(**options):
    """Graft a Base fine-tune onto the Instruct: OUT = I + ALPHA * (TUNED - BASE).

    With --lora, the update is the adapter's: scale * B @ A per adapted weight (DoRA and
    modules_to_save are taken relative to --base). Every tensor with an update is grafted
    unless --include/--exclude say otherwise; the others are copied from the Instruct byte
    for byte. Arithmetic is float32, cast once. The output carries the Instruct's config,
    tokenizer, chat template and generation config.

    \b
    Examples:
      shadowmerge graft --instruct Qwen/Qwen3-4B --base Qwen/Qwen3-4B-Base \\
          --tuned ./qwen3-4b-base-sft --out ./qwen3-4b-shadow
      shadowmerge graft --instruct Qwen/Qwen3-4B --lora ./qwen3-4b-base-lora --out ./qwen3-4b-shadow
      shadowmerge graft ... --alpha 0.8 --exclude 'embed_tokens|lm_head' --dtype bfloat16
      shadowmerge graft ... --dry-run
    """
    from .pipeline import graft as run_graft

    summary = run_graft(from_cli(GraftSpec, options, command=_command()))
    click.echo(str(summary))


@main.command(context_settings={"max_content_width": 100, "ignore_unknown_options": True})
@click.argument("config", metavar="CONFIG")
@click.argument("out", metavar="OUT")
@click.option("--force", is_flag=True, help=FORCE_HELP.replace("--out", "OUT"))
@click.option("-q", "--quiet", is_flag=True, help="No progress bars (mergekit-yaml's --quiet).")
@click.argument("mergekit_args", nargs=-1, type=click.UNPROCESSED, metavar="[MERGEKIT-YAML OPTIONS]...")
def mergekit(config, out, force, quiet, mergekit_args):
    """Run a mergekit YAML with `merge_method: shadow_graft` available.

    Stock mergekit-yaml cannot see a method from another package; this runs mergekit-yaml
    itself, in this process, after registering shadow_graft. A shadow_graft config is checked
    first (base_model, exactly two models with roles instruct and tuned), and the output gets
    the Instruct's config, tokenizer, chat template and generation config instead of the Base's.
    Arithmetic is float32, cast once. Any other mergekit-yaml option is passed through
    (see `mergekit-yaml --help`).

    \b
    Examples:
      shadowmerge mergekit merge_configs/qwen3-4b.yml ./qwen3-4b-shadow
      shadowmerge mergekit merge_configs/qwen3-4b.yml ./qwen3-4b-shadow --cuda --lazy-unpickle
    """
    from .mergekit_run import run

    args = tuple(mergekit_args) + (("--quiet",) if quiet and "--quiet" not in mergekit_args else ())
    click.echo(f"wrote {run(config, out, args, force=force, command=_command())}")


def _parse_pairs(values: tuple[str, ...]) -> dict[str, tuple[str, str]]:
    pairs: dict[str, tuple[str, str]] = {}
    for text in values:
        name, eq, rest = text.partition("=")
        models = rest.split(",")
        if not eq or not name or len(models) != 2 or not all(models):
            raise ShadowMergeError(f"--pair {text!r}: write NAME=BASE,INSTRUCT, e.g. "
                                   f"qwen3-4b=Qwen/Qwen3-4B-Base,Qwen/Qwen3-4B")
        if name in pairs:
            raise ShadowMergeError(f"--pair name {name!r} is used twice; name each pair differently")
        pairs[name] = (models[0], models[1])
    return pairs


@main.command(context_settings={"max_content_width": 100})
@click.option("--base", metavar="MODEL", help="Base model: local folder or Hub id.")
@click.option("--instruct", metavar="MODEL", help="Instruct model: local folder or Hub id.")
@click.option("--tuned", metavar="MODEL", multiple=True, help="A fine-tune of the Base (a model, or a LoRA adapter: its "
              "update is computed on the fly, nothing merged): adds graft-risk diagnostics. Repeated: how the updates "
              "interfere (cosine, sign conflicts per layer and module), before grafting them at once.")
@click.option("--pair", "pairs", multiple=True, metavar="NAME=BASE,INSTRUCT",
              help="A named pair; repeat it to compare many pairs in one report and one bar chart.")
@click.option("--out", metavar="DIR", help="Report folder (written beside, then renamed); optional with --sample and "
              "--candidates, which print their figures.")
@click.option("--sample", type=int, metavar="N", help="σ from N tensors (across layers and module kinds, seeded), read "
              "by range: Hub ids and URLs are never downloaded; the official figure comes with its 99% interval.")
@click.option("--seed", type=int, default=0, show_default=True, help="Which tensors --sample draws.")
@click.option("--candidates", metavar="A,B,...", help="Shadow finder, with --instruct alone: each candidate (folder, "
              "Hub id, URL) checked from headers, the usable ones ranked by sampled σ to the Instruct "
              "(--sample, default 64).")
@click.option("--stream", is_flag=True, help="Read Hub ids by range, each file checked against the Hub's sha256, "
              "instead of downloading them.")
@click.option("--matrix", metavar="TENSOR", help="Also plot this weight matrix of Base and Instruct and their "
              "difference (paper Fig. 2 style).")
@click.option("--matrix-size", type=int, default=48, show_default=True, help="Rows/columns of --matrix to plot.")
@click.option("--force", is_flag=True, help=FORCE_HELP)
@click.option("--allow-pickle", is_flag=True, help="Allow .bin weights (loaded with torch.load(weights_only=True)).")
@click.option("--device", default="cpu", show_default=True, help="Where the sums run: cpu, cuda, cuda:N.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def similarity(base, instruct, tuned, pairs, out, sample, seed, candidates, stream, matrix, matrix_size, force,
               allow_pickle, device, quiet):
    """How close are Base and Instruct? σ = Σ|A−B| / (Σ|A|+Σ|B|), per tensor, layer and module.

    Writes report.html (tables and figures, opens offline), report.json, tensors.csv,
    summary.md and PNG/SVG figures. Two model-level figures, named apart everywhere: the
    official Shadow-FT convention (unweighted mean of per-tensor σ over model.layers.N.*)
    and the parameter-weighted σ over all tensors. With --tuned, per-layer update size and
    cos(T−B, I−B) and a verdict on the graft.

    \b
    Examples:
      shadowmerge similarity --base Qwen/Qwen3-4B-Base --instruct Qwen/Qwen3-4B --out report/
      shadowmerge similarity --pair llama-3.1-8b=meta-llama/Llama-3.1-8B,meta-llama/Llama-3.1-8B-Instruct \\
                             --pair qwen3-4b=Qwen/Qwen3-4B-Base,Qwen/Qwen3-4B --out report/
      shadowmerge similarity --base B --instruct I --tuned T --out report/ --matrix model.layers.0.mlp.up_proj.weight
      shadowmerge similarity --base s3://ckpts/base --instruct org/Instruct --sample 64
      shadowmerge similarity --instruct Qwen/Qwen3-32B --candidates Qwen/Qwen3-32B-Base,Qwen/Qwen3-14B
      shadowmerge similarity --base B --tuned ./math-sft --tuned ./code-lora     # interference before a multi-graft
    """
    from .analyzer import similarity as run_similarity

    if out is None and sample is None and candidates is None and len(tuned) < 2:
        raise ShadowMergeError("--out is required (the report folder); or pass --sample N for a quick estimate "
                               "printed here")
    listed = None
    if candidates is not None:
        listed = [c.strip() for c in candidates.split(",")]
        if not all(listed):
            raise ShadowMergeError(f"--candidates {candidates!r}: write the models separated by commas, e.g. "
                                   f"--candidates org/a,org/b")
    report = run_similarity(base, instruct, list(tuned) if len(tuned) > 1 else (tuned[0] if tuned else None),
                            pairs=_parse_pairs(pairs), out=out, matrix=matrix,
                            matrix_size=matrix_size, force=force, allow_pickle=allow_pickle, device=device,
                            progress=not quiet, command=_command(), sample=sample, seed=seed, stream=stream,
                            candidates=listed)
    click.echo(str(report))


@main.command("train", context_settings={"max_content_width": 100})
@click.argument("recipe", required=False, metavar="[RECIPE.yaml]")
@click.option("--base", metavar="MODEL", help="The Base model to train.")
@click.option("--instruct", metavar="MODEL", help="Its Instruct sibling: gets the update; its chat template is used.")
@click.option("--data", metavar="FILE", help="JSON/JSONL/Parquet (messages, alpaca, sharegpt, or prompt/chosen/"
              "rejected for DPO), or a Hub dataset id.")
@click.option("--out", metavar="DIR", help="Run folder: base-lora|base-full/, shadow/, run.json (+ instruct-ft/).")
@click.option("--method", type=click.Choice(["lora", "full"]), help="LoRA or full fine-tune [default: lora].")
@click.option("--stage", type=click.Choice(["sft", "dpo"]), help="SFT, or DPO on preference pairs [default: sft].")
@click.option("--backend", type=click.Choice(["trl", "llamafactory"]), help="Trainer [default: trl].")
@click.option("--lora-rank", type=int, help="LoRA rank [default: 128].")
@click.option("--lora-alpha", type=float, help="LoRA alpha [default: 2 x rank].")
@click.option("--lr", type=float, help="Learning rate [default: 2e-4 LoRA, 1e-5 full].")
@click.option("--epochs", type=float, help="Epochs [default: 1].")
@click.option("--max-steps", type=int, help="Stop after this many optimizer steps.")
@click.option("--cutoff", type=int, help="Maximum tokens per example [default: 4096].")
@click.option("--batch-size", type=int, help="Per-device batch size [default: 2].")
@click.option("--grad-accum", type=int, help="Gradient accumulation steps [default: 16].")
@click.option("--warmup", type=float, help="Warmup, as a ratio of the steps [default: 0.1].")
@click.option("--seed", type=int, help="Random seed [default: 42].")
@click.option("--max-samples", type=int, help="Use only the first N rows of the data.")
@click.option("--save-steps", type=int, help="A checkpoint every N optimizer steps into OUT.checkpoints/, the latest "
                                             "kept, for --resume; 0: none [default: 500].")
@click.option("--template", help="LLaMA-Factory template name [default: the Instruct's own chat template, which "
                                 "LLaMA-Factory parses from its tokenizer].")
@click.option("--bf16/--no-bf16", default=None, help="bf16 training [default: where the device supports it].")
@click.option("--trainer-arg", "trainer", multiple=True, metavar="KEY=VALUE",
              help="Any other trainer setting, passed through (TRL's SFTConfig/DPOConfig or LLaMA-Factory's YAML), "
                   "e.g. report_to=wandb; repeatable. A recipe's `trainer:` mapping does the same.")
@click.option("--baseline", is_flag=True, help="Also tune the Instruct with the same recipe, into OUT/instruct-ft/.")
@click.option("--eval", "eval", metavar="T1,T2", help="At the end, `shadowmerge eval` of the Instruct, (instruct-ft/ "
              "and) shadow/ on these lm_eval tasks into OUT/eval/; the table goes into run.json and the card. With "
              "--baseline, shadow/ against instruct-ft/ is the headline.")
@click.option("--eval-heldout", metavar="FILE", help="At the end, the held-out loss of those models on these rows.")
@click.option("--eval-include-path", multiple=True, metavar="DIR", help="Task YAMLs of your own for --eval.")
@click.option("--eval-limit", type=float, metavar="N", help="With --eval: only the first N items of each task (a "
              "fraction if < 1), as `eval --limit`.")
@click.option("--emit-only", is_flag=True, help="llamafactory backend: write its configs and stop.")
@click.option("--finish", metavar="OUT", help="After --emit-only and running its LLaMA-Factory configs yourself: "
                                              "graft, σ, loss plot, card and run.json into OUT.")
@click.option("--resume", is_flag=True, help="Go on from the last checkpoint of an interrupted run of the same "
                                             "recipe (in OUT.checkpoints/).")
@click.option("--force", is_flag=True, help=FORCE_HELP + " Also: start over, deleting the checkpoints of an "
              "interrupted run.")
@click.option("--allow-pickle", is_flag=True, help="Allow .bin weights (loaded with torch.load(weights_only=True)).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars (the trainer's, the libraries'); the stage lines "
                                                  "and the loss per logged step stay.")
def train_command(recipe, baseline, emit_only, finish, resume, force, allow_pickle, quiet, **settings):
    """Tune the Base with an existing trainer, then graft the update onto the Instruct.

    prepare (checks: same architecture and shapes, every data row, a free --out) -> train
    the Base (TRL by default, or LLaMA-Factory) on data formatted with the Instruct's chat
    template -> graft (LoRA: the adapter; full: tuned - base) into OUT/shadow/ -> done.
    Defaults are the paper's recipe; a RECIPE.yaml sets any of them, and flags override it.

    \b
    Examples:
      shadowmerge train --base Qwen/Qwen3-4B-Base --instruct Qwen/Qwen3-4B --data train.jsonl \\
                        --method lora --out runs/qwen3-4b
      shadowmerge train recipe.yaml --stage dpo --baseline
      shadowmerge train recipe.yaml --backend llamafactory --emit-only
      shadowmerge train --finish runs/qwen3-4b                # after running those configs yourself
      shadowmerge train recipe.yaml --trainer-arg report_to=wandb --trainer-arg logging_steps=10
      shadowmerge train recipe.yaml --resume                  # after Ctrl-C: from the last checkpoint
      shadowmerge train recipe.yaml --baseline --eval mytask --eval-include-path tasks/ --eval-heldout val.jsonl
      accelerate launch -m shadowmerge train recipe.yaml      # several GPUs
    """
    from .train import finish as finish_run
    from .train import load, train
    from .train.recipe import trainer_args

    if finish is not None:
        given = [f"--{k.replace('_', '-')}" for k, v in settings.items() if v not in (None, ())]
        given += [flag for flag, on in (("--baseline", baseline), ("--emit-only", emit_only), ("--resume", resume),
                                        ("--force", force), ("--allow-pickle", allow_pickle)) if on]
        if recipe or given:
            raise ShadowMergeError(f"--finish OUT takes no other settings ({', '.join(given) or recipe}): the run is "
                                   f"the one OUT/run.json records")
        click.echo(str(finish_run(finish, command=_command(), progress=not quiet)))
        return
    settings["trainer"] = trainer_args(settings["trainer"]) or None
    click.echo(str(train(load(recipe, settings), baseline=baseline, emit_only=emit_only, force=force, resume=resume,
                         progress=not quiet,
                         allow_pickle=allow_pickle, command=_command())))


@main.command(context_settings={"max_content_width": 100})
@cli_options(ExtractSpec)
def extract(**options):
    """Turn a full fine-tune's update (tuned - base) into a PEFT LoRA adapter.

    Per linear module (and per expert of a MoE's fused expert parameters): ΔW = T - B in float32,
    its truncated SVD at --rank, or at the rank that keeps --energy of the squared singular
    values. peft loads the adapter (onto the Instruct with
    --for-instruct); OUT/extract.json and OUT/extract.png give each module's relative error
    ‖ΔW - BA‖/‖ΔW‖ and the energy kept.

    \b
    Examples:
      shadowmerge extract --base Qwen/Qwen3-4B-Base --tuned ./qwen3-4b-sft --out ./sft-lora --rank 64
      shadowmerge extract --base ./base --tuned ./tuned --out ./lora --energy 0.99 --for-instruct ./instruct
      shadowmerge extract ... --rank 128 --dtype bfloat16 --device cuda
    """
    from .extract import extract as run_extract

    click.echo(str(run_extract(from_cli(ExtractSpec, options, command=_command()))))
    _warn_adapter_loading()


@main.command(context_settings={"max_content_width": 100})
@click.argument("out", metavar="OUT")
@click.option("--recompute", is_flag=True, help="Also re-read the inputs named in the record and recompute every "
              "tensor (grafted, cast or copied; an extracted adapter's factors); the output must match.")
@click.option("--sample", type=int, metavar="N", help="With --recompute: only N tensors, picked at random (seed 0).")
@click.option("--device", default="cpu", show_default=True, help="Where --recompute's arithmetic runs: cpu, cuda.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def verify(out, recompute, sample, device, quiet):
    """Check any output folder shadowmerge wrote against its record.

    Every file's sha256 and every safetensors header must match the manifest that was written
    into its record (shadowmerge.json; train: run.json, eval: eval.json, extract: extract.json,
    similarity: report.json) with the output; no file may be missing or added. --recompute also
    recomputes the tensors from the inputs: bit for bit for grafts, merges and full copies; an
    extracted adapter's factors as the truncated SVD of the update, to within float32's error.
    Exits 0 only when all holds; otherwise a one-line error names the first file or tensor that
    does not.

    \b
    Examples:
      shadowmerge verify ./qwen3-4b-shadow
      shadowmerge verify ./qwen3-4b-shadow --recompute --sample 20
    """
    from .verify import verify as run_verify

    click.echo(str(run_verify(out, recompute=recompute, sample=sample, device=device, progress=not quiet)))


def options_of_eval_settings(command):
    from .evaluate.settings import EvalSettings

    return cli_options(EvalSettings)(command)


def _alphas(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(a) for a in text.split(",") if a.strip())
    except ValueError:
        raise ShadowMergeError(f"--alpha {text!r}: give numbers separated by commas, e.g. --alpha 0.5,0.75,1,1.25") \
            from None


@main.command("eval", context_settings={"max_content_width": 100})
@click.argument("models", nargs=-1, metavar="[LABEL=MODEL]...")
@click.option("--out", required=True, metavar="DIR", help="Report folder (written beside, then renamed).")
@options_of_eval_settings
@click.option("--alpha", "alphas", metavar="A1,A2", help="α sweep: evaluate I + α·Δ for each value (with --instruct "
              "and --lora, or --base and --tuned); each is what `graft --alpha` writes. [default with those: 1, "
              "the graft itself]")
@click.option("--instruct", metavar="MODEL", help="α sweep: the Instruct (the reference).")
@click.option("--lora", metavar="ADAPTER", multiple=True, help="α sweep: the adapter trained on the Base (repeatable, "
              "with --tuned too: several updates, as graft combines them).")
@click.option("--base", metavar="MODEL", help="α sweep: the Base that was tuned.")
@click.option("--tuned", metavar="MODEL", multiple=True, help="α sweep: the tuned Base (repeatable).")
@click.option("--weights", metavar="W1,W2,...", help="α sweep of several updates: graft's --weights; several sets "
              "separated by ';' (e.g. '1,1;1,0.5') sweep them too.")
@click.option("--combine", default="sum", show_default=True, metavar="METHOD[,METHOD]", help="α sweep of several "
              "updates: graft's --combine (sum, ties, dare_ties, dare_linear); several separated by ',' sweep them "
              "too.")
@click.option("--density", type=float, help="α sweep with --combine ties/dare_*: graft's --density.")
@click.option("--dare-seed", type=int, default=0, show_default=True, help="α sweep with --combine dare_*: graft's "
              "--seed.")
@click.option("--force", is_flag=True, help=FORCE_HELP)
@click.option("--allow-pickle", is_flag=True, help="Allow .bin weights (loaded with torch.load(weights_only=True)).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars (one line per model stays).")
def eval_command(models, out, alphas, instruct, lora, base, tuned, weights, combine, density, dare_seed, force,
                 allow_pickle, quiet, **settings):
    """Evaluate models side by side: lm_eval tasks, held-out loss, paired statistics.

    The first model is the reference; each other one is compared with it item by item, and
    each pair named with --compare A:B (the headline): n, how many items differ, wins and
    losses, Δ with a 95 % interval that agrees with its test (McNemar's exact test for
    right/wrong metrics, a paired t-test otherwise), and a verdict: better, worse, within
    noise, or too few to decide (5 or fewer differing items can never reach p < 0.05).
    Models are LABEL=PATH_OR_HUB_ID (or a bare path, labelled by its folder name), each
    evaluated with the same settings and its own tokenizer and chat template, one at a time.
    Writes eval.json, eval.md, eval.png, report.html and lm_eval's per-item logs (samples/).

    \b
    Examples:
      shadowmerge eval instruct=Qwen/Qwen3-4B ft=runs/q/instruct-ft shadow=runs/q/shadow \\
                       --compare shadow:ft --tasks mytask,gsm8k --include-path tasks/ \\
                       --heldout val.jsonl --out eval/
      shadowmerge eval instruct=./instruct shadow=./shadow --heldout val.jsonl --out eval/
      shadowmerge eval --instruct Qwen/Qwen3-4B --lora ./base-lora --alpha 0.5,0.75,1,1.25 \\
                       --tasks mytask --include-path tasks/ --out sweep/
      shadowmerge eval --instruct Qwen/Qwen3-4B --base Qwen/Qwen3-4B-Base --tuned ./math --tuned ./code \\
                       --weights '1,1;1,0.5' --combine sum,ties --density 0.5 --alpha 1 \\
                       --heldout val.jsonl --out grid/
      shadowmerge eval a=./a b=./b --tasks gsm8k --backend vllm --model-args tensor_parallel_size=2 --out e/
    """
    from .evaluate import EvalSettings, Sweep, evaluate

    values = _alphas(alphas)
    lora = None if not lora else lora[0] if len(lora) == 1 else tuple(lora)
    tuned = None if not tuned else tuned[0] if len(tuned) == 1 else tuple(tuned)
    several = {"weights": weights, "combine": combine, "density": density, "seed": dare_seed}
    sweep_inputs = {"--instruct": instruct, "--lora": lora, "--base": base, "--tuned": tuned}
    sweep = None
    if values is None and instruct is not None and (lora is not None or (base is not None and tuned is not None)):
        values = (1.0,)                # the graft itself: the Instruct and I + Δ
    if values is not None:
        if instruct is None or (lora is None and (base is None or tuned is None)) or (tuned and base is None):
            raise ShadowMergeError("--alpha sweeps I + α·Δ: pass --instruct with --lora ADAPTER, or with --base and "
                                   "--tuned")
        sweep = Sweep(instruct, values, base=base, tuned=tuned, lora=lora, **several)
    elif any(sweep_inputs.values()) or weights or density is not None or combine != "sum":
        given = ", ".join(k for k, v in {**sweep_inputs, "--weights": weights, "--density": density,
                                         "--combine": combine != "sum"}.items() if v)
        raise ShadowMergeError(f"{given}: evaluating the graft I + α·Δ needs --instruct with --lora ADAPTER, or "
                               f"with --base and --tuned; add the missing one, or give the models as LABEL=PATH "
                               f"arguments")
    click.echo(str(evaluate(list(models), from_cli(EvalSettings, settings), out=out, force=force, sweep=sweep, allow_pickle=allow_pickle,
                            progress=not quiet, command=_command())))


@main.group(context_settings={"max_content_width": 100})
def lora():
    """LoRA adapters trained on the Base (to merge one, use `graft --lora`).

    \b
    Example:
      shadowmerge lora retarget ./qwen3-4b-base-lora --instruct Qwen/Qwen3-4B --out ./qwen3-4b-shadow-lora
    """


@lora.command(context_settings={"max_content_width": 100})
@click.argument("adapter", metavar="ADAPTER")
@click.option("--instruct", required=True, metavar="MODEL", help="Instruct model to serve the adapter on.")
@click.option("--out", required=True, metavar="DIR", help="Output adapter folder (written beside, then renamed).")
@click.option("--force", is_flag=True, help=FORCE_HELP)
@click.option("--allow-pickle", is_flag=True, help="Allow .bin weights (loaded with torch.load(weights_only=True)).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar (downloading a Hub adapter).")
def retarget(adapter, instruct, out, force, allow_pickle, quiet):
    """Point a Base-trained LoRA ADAPTER at the Instruct model, without merging.

    The weights are copied unchanged; adapter_config.json's base_model_name_or_path names
    the Instruct, and shadowmerge.json and README.md say where the adapter was trained.
    Every adapted module is checked against the Instruct's tensor names and shapes first.
    DoRA and modules_to_save adapters are refused: their update depends on the Base weights,
    so merge those with `graft --lora ... --base ...`.

    \b
    Example:
      shadowmerge lora retarget ./qwen3-4b-base-lora --instruct Qwen/Qwen3-4B --out ./qwen3-4b-shadow-lora
      vllm serve Qwen/Qwen3-4B --enable-lora --lora-modules shadow=./qwen3-4b-shadow-lora
    """
    from .lora.retarget import retarget as run_retarget

    click.echo(str(run_retarget(adapter, instruct, out, force=force, allow_pickle=allow_pickle, progress=not quiet,
                                command=_command())))
    _warn_adapter_loading()


if __name__ == "__main__":
    main()
