"""The ``retromae-st`` command: pretrain, finetune, evaluate, run a recipe, or the offline quickstart.

User errors (bad input, bad options, missing files) end with exit code 2 and one line that says what is
wrong and what to do; never a traceback. ``--debug`` shows the traceback anyway.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from retromae_st import __version__
from retromae_st.allocator import HINT_START
from retromae_st.errors import NonFiniteLossError, UserInputError

logger = logging.getLogger("retromae_st")

EXIT_USER_ERROR = 2
EXIT_TRAINING_FAILED = 3

# The INFO messages of ours that the console shows, by logger and message start ("" = all of that logger):
# where a run stands (stage headlines, skips, results, where things are). Everything else, and every other
# library's INFO, goes to run.log only, which keeps the console of a quickstart to a screenful.
CONSOLE_INFO: dict[str, tuple[str, ...]] = {
    "retromae_st": ("",),  # this module's own: the pretrain / finetune commands' corpus and window counts
    "retromae_st.pipeline": ("",),
    "retromae_st.allocator": (HINT_START,),
    "retromae_st.evaluation.run": ("",),
    "retromae_st.pretraining.training": (
        "RetroMAE pretraining:",
        "Resuming from",
        "Saved the pretrained model",
    ),
    "retromae_st.finetuning.train": ("Effective batch size", "Resuming from"),
    "retromae_st.finetuning.model_card": ("Saved the fine-tuned model",),
}


class ConsoleFilter(logging.Filter):
    """Lets through warnings and errors (except Python ``warnings``, which go to run.log only: they are the
    libraries' notes to developers) and our curated INFO messages (:data:`CONSOLE_INFO`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "py.warnings":
            return False
        if record.levelno >= logging.WARNING:
            return True
        if record.levelno < logging.INFO:
            return False
        starts = CONSOLE_INFO.get(record.name)
        return starts is not None and str(record.msg).startswith(starts)


class ConsoleFormatter(logging.Formatter):
    """Our INFO lines as plain sentences; warnings and errors say their level and where they come from."""

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno == logging.INFO:
            return record.getMessage()
        return f"{record.levelname} {record.name}: {record.getMessage()}"


def configure_logging() -> logging.Handler:
    """The console handler (stderr, filtered by :class:`ConsoleFilter`); the root logger at INFO so that
    run.log (:func:`retromae_st.pipeline.add_file_logging`) gets every library's INFO and Python warnings."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "retromae_console", False):  # main() called again in one process (tests)
            root.removeHandler(handler)
    console = logging.StreamHandler(sys.stderr)
    console.retromae_console = True  # type: ignore[attr-defined]
    console.addFilter(ConsoleFilter())
    console.setFormatter(ConsoleFormatter())
    root.addHandler(console)
    root.setLevel(logging.INFO)
    # Off, then on: a second main() in one process (tests, scripts) whose warnings hook was replaced
    # meanwhile (warnings.catch_warnings restores its own) would otherwise keep that one.
    logging.captureWarnings(False)
    logging.captureWarnings(True)
    return console


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overwrite", action="store_true", help="replace existing outputs instead of refusing"
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow code shipped inside a model folder to run when loading it (off by default)",
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow pickle (.bin) weights; by default only safetensors are read",
    )


def _training(parser: argparse.ArgumentParser, lr: float | str, batch: int, lr_help: str = "") -> None:
    parser.add_argument(
        "--batch-size", type=int, default=batch, help=f"per-device batch size (default {batch})"
    )
    parser.add_argument(
        "--lr",
        type=_auto_or_positive if lr == "auto" else float,
        default=lr,
        help=f"peak learning rate (default {lr_help or lr})",
    )
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over the data (default 1)")
    parser.add_argument(
        "--max-steps", type=int, default=-1, help="stop after this many steps (overrides --epochs)"
    )
    parser.add_argument("--warmup-ratio", type=float, default=0.1, help="share of steps with rising lr")
    parser.add_argument("--save-steps", type=int, default=500, help="checkpoint every N steps (resume point)")
    parser.add_argument("--logging-steps", type=int, default=10, help="log losses every N steps")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="bfloat16 mixed precision; without a bf16 GPU it runs on the CPU under autocast (with a warning "
        "when the CPU has no native bf16: then usually slower than fp32)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retromae-st",
        description="RetroMAE pretraining + contrastive fine-tuning for Sentence-Transformers models.",
    )
    parser.add_argument("--version", action="version", version=f"retromae-st {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    quick = commands.add_parser(
        "quickstart",
        help="the whole two-stage pipeline on Python's own documentation, offline, in minutes",
        description="Pretrain a small model with RetroMAE on Python's bundled documentation, fine-tune it on "
        "(docstring summary, docstring body) pairs, and compare the untrained, stage-1 and stage-2 models "
        "on held-out pairs. Needs no download.",
    )
    quick.add_argument(
        "--output", default="quickstart-output", help="output folder (default quickstart-output)"
    )
    quick.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value"
    )
    quick.add_argument("--overwrite", action="store_true", help="start afresh, replacing an earlier run")
    quick.add_argument("--debug", action="store_true", help="show full tracebacks")

    run = commands.add_parser(
        "run",
        help="run every stage of a recipe (skips finished stages, resumes interrupted ones)",
        description="Run a YAML recipe: model, stage 1, stage 2, evaluation. Re-running the same command after an "
        "interruption continues from the last checkpoint; finished stages are skipped.",
    )
    run.add_argument("recipe", help="path to a recipe YAML file (see recipes/)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe value, e.g. --set pretrain.max_steps=100 (repeatable)")  # fmt: skip
    run.add_argument(
        "--output-root", default=".", help="folder the recipe's output_dir is relative to (default .)"
    )
    run.add_argument(
        "--check",
        action="store_true",
        help="make every check a run makes before training (options, input paths, BEIR folders, models), "
        "print the recipe, and stop",
    )
    run.add_argument("--overwrite", action="store_true", help="start afresh, replacing an earlier run")
    run.add_argument("--debug", action="store_true", help="show full tracebacks")

    pre = commands.add_parser(
        "pretrain",
        help="stage 1: RetroMAE pretraining on unlabeled text",
        description="Pretrain an encoder with RetroMAE. The result (OUTPUT/final) is a plain Sentence-Transformers "
        "model; fine-tune it before using it for search. It pools by CLS when built from a preset (RetroMAE's "
        "decoder reads the [CLS] vector) or from a plain transformers checkpoint, and by the model's own pooling "
        "when started from a Sentence-Transformers model (e.g. mean for all-MiniLM-L6-v2), unless --pooling is "
        "given; the log says which.",
    )
    pre.add_argument(
        "--model", required=True, help="a preset (retromae-tiny/small/base), a model folder or hub name"
    )
    pre.add_argument("--corpus", required=True,
                     help="text/jsonl/json/csv/parquet file, a folder of them, a BEIR folder, or a hub dataset")  # fmt: skip
    pre.add_argument("--output", required=True, help="output folder")
    pre.add_argument("--text-column", default="text", help="text column of json/csv/parquet/hub data")
    pre.add_argument("--hf-config", default=None, help="hub dataset config name")
    pre.add_argument("--hf-split", default="train", help="hub dataset split")
    pre.add_argument(
        "--tokenizer", default=None, help="tokenizer for a preset (default: train one on the corpus)"
    )
    pre.add_argument("--vocab-size", type=int, default=8000, help="size of a tokenizer trained on the corpus")
    pre.add_argument(
        "--max-seq-length",
        type=int,
        default=None,
        help="window length; longer texts are cut into windows (default: 128 for a preset, the model's own "
        "for an existing model)",
    )
    pre.add_argument(
        "--pooling",
        choices=["cls", "mean"],
        default=None,
        help="pooling of the result (default: cls for a preset or a plain transformers checkpoint, the "
        "model's own for a Sentence-Transformers model; a different one replaces its Pooling module)",
    )
    pre.add_argument(
        "--attention-init-gain",
        type=_gain_or_bert,
        default="default",
        help="a preset's attention value/output projections start at std GAIN/sqrt(hidden), so [CLS] carries the "
        "text from the first step (default 1; 'bert': BERT's std 0.02, under which a from-scratch [CLS] does "
        "not learn); presets only",
    )
    pre.add_argument("--pack", action="store_true", help="pack short documents into full windows")
    pre.add_argument(
        "--encoder-mask-ratio", type=float, default=0.3, help="encoder masking ratio (0-1, default 0.3)"
    )
    pre.add_argument(
        "--decoder-mask-ratio", type=float, default=0.5, help="decoder masking ratio (0-1, default 0.5)"
    )
    pre.add_argument("--decoding", choices=["enhanced", "basic"], default="enhanced", help="decoder variant")
    pre.add_argument("--decoder-layers", type=int, default=1, help="decoder layers (default 1)")
    pre.add_argument("--bow-weight", type=float, default=0.0, help="DupMAE bag-of-words weight (0 = off)")
    pre.add_argument(
        "--max-length-groups",
        type=int,
        default=4,
        help="run each batch as up to this many sub-batches of similar length, less padding (1 = off)",
    )
    pre.add_argument(
        "--head-warmup-steps",
        type=_auto_or_count,
        default="auto",
        help="first steps that train only a fresh MLM head and the decoder, encoder frozen (default auto: up "
        "to 50 when the model has no MLM head and is pretrained; 0 = off)",
    )
    pre.add_argument(
        "--head-lr-factor",
        type=_auto_or_positive,
        default="auto",
        help="learning-rate multiple for the decoder and MLM head (default auto: 10 when the head is fresh "
        "and the encoder pretrained, else 1)",
    )
    pre.add_argument(
        "--compile",
        action="store_true",
        help="run the encoder and decoder through torch.compile (first steps pay the compile time)",
    )
    pre.add_argument(
        "--packed",
        nargs="?",
        const=True,
        default="auto",
        type=_auto_or_bool,
        metavar="{auto,true,false}",
        help="run the encoder on each batch's real tokens only, packed into one stream (BERT, RoBERTa, "
        "XLM-R, DistilBERT, ELECTRA, ModernBERT; others fall back to length groups); default auto: where "
        "it pays (CUDA, or hidden size >= 256 on CPU); --packed alone: true",
    )
    _training(
        pre,
        lr="auto",
        batch=32,
        lr_help="auto: 1e-3 for retromae-tiny and 5e-4 for retromae-small from scratch, 1e-4 for retromae-base "
        "and an existing model with a masked-LM head, 5e-5 for one without (an embedding model)",
    )
    _common(pre)

    fine = commands.add_parser(
        "finetune",
        help="stage 2: MultipleNegativesRankingLoss on (query, positive) pairs",
        description="Fine-tune a model (usually a stage-1 model) contrastively with in-batch negatives.",
    )
    fine.add_argument(
        "--model", required=True, help="model folder or hub name (e.g. OUTPUT/final of pretrain)"
    )
    fine.add_argument(
        "--train", required=True, help="a BEIR folder (uses --split qrels), a pair file, or a hub dataset"
    )
    fine.add_argument("--output", required=True, help="output folder")
    fine.add_argument("--split", default="train", help="qrels split / hub split of the training pairs")
    fine.add_argument(
        "--dev", default=None, help="BEIR folder to evaluate during training (keeps the best checkpoint)"
    )
    fine.add_argument("--dev-split", default="dev", help="qrels split of --dev")
    fine.add_argument("--max-pairs", type=int, default=None, help="use at most this many training pairs")
    fine.add_argument(
        "--loss", choices=["mnrl", "cached_mnrl"], default="mnrl", help="cached_mnrl for big batches"
    )
    fine.add_argument("--hard-negatives", type=int, default=0, help="mine this many hard negatives per pair")
    fine.add_argument("--max-seq-length", type=int, default=None, help="truncate inputs to this length")
    _training(fine, lr=2e-5, batch=64)
    _common(fine)

    ev = commands.add_parser(
        "evaluate",
        help="retrieval evaluation (FAISS on BEIR folders, MTEB tasks) into a report",
        description="Evaluate one or more models and write report.md, report.json and plots to --output.",
    )
    ev.add_argument("--model", action="append", required=True, metavar="[LABEL=]PATH",
                    help="a model folder or hub name, optionally labelled for the report (stage1=runs/pt/final); "
                    "repeat for several models. Unlabelled ones are named after their folder (runs/pt/final -> "
                    "pt), extended with parent folders until the names differ")  # fmt: skip
    ev.add_argument("--beir", action="append", default=[], metavar="FOLDER",
                    help="BEIR folder to evaluate with FAISS; repeat for several (default: none)")  # fmt: skip
    ev.add_argument("--mteb", action="append", default=[], metavar="TASK",
                    help="MTEB task name, or a BEIR folder run as an MTEB task; repeat for several (default: none)."
                    " At least one --beir or --mteb is needed")  # fmt: skip
    ev.add_argument("--split", default="test", help="qrels split (default: test)")
    ev.add_argument("--index", default="flat",
                    help="flat (exact), hnsw, ivfpq or a faiss factory string (default: flat)")  # fmt: skip
    ev.add_argument("--batch-size", type=int, default=64, help="encoding batch size (default: 64)")
    ev.add_argument("--cache-dir", default=None,
                    help="cache embeddings and MTEB scores here (default: no cache)")  # fmt: skip
    ev.add_argument("--training-log", action="append", default=[], metavar="LABEL=PATH",
                    help="plot a trainer_state.json / training_log.json as LABEL; repeat for several (default: none)")  # fmt: skip
    ev.add_argument("--output", required=True, help="report folder")
    _common(ev)
    return parser


# -- commands -------------------------------------------------------------------------------------------


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from retromae_st.pipeline import run_recipe, summary_lines
    from retromae_st.recipes import bundled_recipe, load_recipe

    recipe = load_recipe(bundled_recipe("quickstart"), args.set)
    output = Path(args.output).resolve()
    outputs = run_recipe(recipe, output, overwrite=args.overwrite, command=_command_line())
    _print_report(output / "report")
    for line in summary_lines(outputs, output / "report"):
        print(line)
    print(f'Use it: SentenceTransformer("{output / "stage2" / "final"}").encode(["your text"])')
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    import yaml

    from retromae_st.recipes import load_recipe, resolve_output

    recipe = load_recipe(args.recipe, args.set)  # validate before the heavy imports below
    from retromae_st.pipeline import check_recipe, run_recipe, summary_lines

    output = resolve_output(args.output_root, recipe.output_dir)
    if args.check:
        # Everything a run checks before it trains (options, input paths, BEIR folders, models), so a recipe
        # that passes --check does not fail on one of those later.
        check_recipe(recipe)
        if recipe.export:
            resolve_output(args.output_root, recipe.export)
        print(yaml.safe_dump(recipe.model_dump(), sort_keys=False), end="")
        print(f"# output: {output}")
        return 0
    export = resolve_output(args.output_root, recipe.export) if recipe.export else None
    outputs = run_recipe(recipe, output, overwrite=args.overwrite, command=_command_line(), export_to=export)
    for line in summary_lines(outputs, output / "report"):
        print(line)
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from retromae_st.data.sources import load_texts
    from retromae_st.data.tokenize import tokenize_corpus
    from retromae_st.io import ensure_can_write
    from retromae_st.models import PRESETS, load_encoder, resolve_stage1_learning_rate, stage1_learning_rate
    from retromae_st.pipeline import add_file_logging, is_main_process, main_process_first
    from retromae_st.pretraining.training import check_pretrain_options, pretrain

    learning_rate = stage1_learning_rate(args.lr, args.model)
    # The option checks first: reading and tokenising a corpus can take minutes.
    check_pretrain_options(
        loss_kwargs=_loss_kwargs(args), batch_size=args.batch_size, learning_rate=learning_rate,
        num_train_epochs=args.epochs, max_steps=args.max_steps, warmup_ratio=args.warmup_ratio,
        save_steps=args.save_steps, logging_steps=args.logging_steps, bf16=args.bf16,
        hidden_size=PRESETS[args.model].hidden if args.model in PRESETS else None,
    )  # fmt: skip
    if args.attention_init_gain != "default" and args.model not in PRESETS:
        raise UserInputError(
            f"--attention-init-gain applies to a preset built from scratch, not to {args.model!r}: drop it."
        )
    output = Path(args.output)
    ensure_can_write(output / "final", args.overwrite)
    add_file_logging(output)
    dataset, stats = load_texts(
        args.corpus, text_column=args.text_column, hf_config=args.hf_config, hf_split=args.hf_split
    )
    logger.info("Corpus: %s", stats.summary())
    if args.model in PRESETS:
        with main_process_first(output):  # under torchrun, one process trains the tokenizer
            model = _preset_model(
                args, output, dataset["text"], reuse=not args.overwrite or not is_main_process()
            )
    else:
        model = load_encoder(
            args.model, max_seq_length=args.max_seq_length, pooling=args.pooling,
            trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle,
        )  # fmt: skip
    learning_rate = resolve_stage1_learning_rate(args.lr, args.model, model, "--lr")
    windows, stats = tokenize_corpus(
        dataset, model.tokenizer, model.max_seq_length, pack=args.pack, cache_dir=output / "cache"
    )
    logger.info("Windows: %s", stats.summary())
    pretrain(
        model,
        windows,
        output,
        loss_kwargs=_loss_kwargs(args),
        batch_size=args.batch_size,
        learning_rate=learning_rate,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        warmup_ratio=args.warmup_ratio,
        save_steps=args.save_steps,
        logging_steps=args.logging_steps,
        seed=args.seed,
        bf16=args.bf16,
        overwrite=args.overwrite,
    )
    print(f"model: {output / 'final'}")
    return 0


def _auto_or_count(value: str) -> int | str:
    """``auto`` or a whole number >= 0 (argparse type)."""
    if value == "auto":
        return value
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value!r}: use 'auto' or a whole number >= 0")
    return number


def _auto_or_bool(value: str) -> bool | str:
    choices = {"auto": "auto", "true": True, "on": True, "false": False, "off": False}
    if value.lower() not in choices:
        raise argparse.ArgumentTypeError(f"expected auto, true or false, got {value!r}")
    return choices[value.lower()]


def _gain_or_bert(value: str) -> float | str | None:
    """``bert`` (None: BERT's initialisation) or a number in (0, 10] (argparse type; ``default``, the
    option's default, passes through: argparse converts string defaults too)."""
    if value == "default":
        return value
    if value.lower() == "bert":
        return None
    try:
        gain = float(value)
    except ValueError:
        gain = -1.0
    if not 0 < gain <= 10:
        raise argparse.ArgumentTypeError(f"expected 'bert' or a number in (0, 10], got {value!r}")
    return gain


def _auto_or_positive(value: str) -> float | str:
    """``auto`` or a finite number > 0 (argparse type: --head-lr-factor, pretrain --lr)."""
    if value == "auto":
        return value
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number > 0, got {value!r}") from None
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number > 0, got {value!r}")
    return number


def _loss_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """RetroMAELoss's options from the pretrain command's flags."""
    return {
        "encoder_mask_ratio": args.encoder_mask_ratio,
        "decoder_mask_ratio": args.decoder_mask_ratio,
        "decoding": args.decoding,
        "decoder_layers": args.decoder_layers,
        "bow_weight": args.bow_weight,
        "max_length_groups": args.max_length_groups,
        "head_warmup_steps": args.head_warmup_steps,
        "head_lr_factor": args.head_lr_factor,
        "compile": args.compile,
        "packed": args.packed,
    }


def _preset_model(args: argparse.Namespace, output: Path, texts: list[str], reuse: bool) -> Any:
    """A from-scratch preset; the tokenizer of an earlier run (``OUTPUT/init``) is reused when ``reuse``.

    Reuse matters when resuming (the checkpoints were trained with that vocabulary, and training a
    tokenizer again is not deterministic across processes) and under torchrun (one process trains it).
    """
    from transformers import AutoTokenizer

    from retromae_st.models import build_model, train_wordpiece_tokenizer

    earlier = output / "init"
    if reuse and not args.tokenizer and (earlier / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(earlier))
        logger.info("Reusing the tokenizer of the earlier run in %s", earlier)
    elif args.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, trust_remote_code=args.trust_remote_code)
    else:
        tokenizer = train_wordpiece_tokenizer(texts, vocab_size=args.vocab_size)
    return build_model(
        args.model, tokenizer, max_seq_length=args.max_seq_length, pooling=args.pooling, save_dir=earlier,
        seed=args.seed, attention_init_gain=args.attention_init_gain,
    )  # fmt: skip


def _cmd_finetune(args: argparse.Namespace) -> int:
    from retromae_st.finetuning.negatives import mine_negatives
    from retromae_st.finetuning.pairs import dev_evaluator, load_pairs
    from retromae_st.finetuning.train import check_finetune_options, finetune
    from retromae_st.models import load_encoder
    from retromae_st.pipeline import add_file_logging

    # The option checks first, before loading the model and the pairs and mining negatives.
    check_finetune_options(
        batch_size=args.batch_size, save_steps=args.save_steps, has_evaluator=args.dev is not None,
        max_steps=args.max_steps, epochs=args.epochs, logging_steps=args.logging_steps, learning_rate=args.lr,
    )  # fmt: skip
    model = load_encoder(
        args.model, max_seq_length=args.max_seq_length, trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle,
    )  # fmt: skip
    output = Path(args.output)
    add_file_logging(output)
    pairs = load_pairs(args.train, split=args.split, max_pairs=args.max_pairs, seed=args.seed)
    if args.hard_negatives:
        pairs = mine_negatives(pairs, model, num_negatives=args.hard_negatives)
    evaluator = dev_evaluator(args.dev, split=args.dev_split) if args.dev else None
    finetune(
        model, pairs, output, evaluator=evaluator, loss=args.loss, batch_size=args.batch_size,
        learning_rate=args.lr, epochs=args.epochs, max_steps=args.max_steps, warmup_ratio=args.warmup_ratio,
        save_steps=args.save_steps, logging_steps=args.logging_steps, seed=args.seed, bf16=args.bf16,
        overwrite=args.overwrite, train_dataset_name=args.train,
    )  # fmt: skip
    print(f"model: {output / 'final'}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from retromae_st.evaluation import evaluate

    logs: dict[str, Any] = {}
    for item in args.training_log:
        label, sep, path = item.partition("=")
        if not sep:
            raise UserInputError(f"--training-log {item!r} must look like LABEL=PATH")
        logs[label] = path
    evaluate(
        _labelled_models(args.model),
        output_dir=args.output,
        beir_folders=args.beir,
        mteb_tasks=args.mteb,
        split=args.split,
        index=args.index,
        batch_size=args.batch_size,
        cache_dir=args.cache_dir,
        training_logs=logs,
        command=_command_line(),
        overwrite=args.overwrite,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
    )
    _print_report(Path(args.output))
    print(f"report: {Path(args.output) / 'report.md'}")
    return 0


def _labelled_models(items: list[str]) -> dict[str, str]:
    """``--model [LABEL=]PATH`` values -> label -> path, unlabelled ones named by ``default_labels``."""
    from retromae_st.evaluation.run import default_labels

    given: list[tuple[str | None, str]] = []
    for item in items:
        label, sep, path = item.partition("=")
        if not sep:
            given.append((None, item))
        elif not label.strip() or not path.strip():
            raise UserInputError(
                f"--model {item!r} must look like PATH or LABEL=PATH (e.g. stage1=runs/pt/final)"
            )
        else:
            given.append((label.strip(), path.strip()))
    derived = iter(default_labels([path for label, path in given if label is None]))
    labelled = [(label if label is not None else next(derived), path) for label, path in given]
    labels = [label for label, _ in labelled]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise UserInputError(
            f"several --model values are labelled {duplicates}: give them distinct labels with --model LABEL=PATH."
        )
    return dict(labelled)


def _print_report(folder: Path) -> None:
    """The report's results tables; the rest (models, plots, logs, the full configuration) stays in the
    file, whose path the command prints after this."""
    report = folder / "report.md"
    if report.is_file():
        print(results_section(report.read_text(encoding="utf-8")))


def results_section(markdown: str) -> str:
    """The ``## Results`` section of a report (up to the next ``##`` heading); the whole text without one."""
    lines = markdown.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == "## Results"]
    if not starts:
        return markdown
    ends = [i for i in range(starts[0] + 1, len(lines)) if lines[i].startswith("## ")]
    return "\n".join(lines[starts[0] : ends[0] if ends else len(lines)]).strip() + "\n"


def _command_line() -> str:
    return " ".join(shlex.quote(part) for part in ["retromae-st", *sys.argv[1:]])


def _locked(command: Any) -> Any:
    """Run a command holding the lock on its ``--output`` folder (one run writes into a folder at a time).

    Under torchrun only the first process takes it: the others are part of the same run.
    """

    def run(args: argparse.Namespace) -> int:
        from retromae_st.io import output_lock

        if int(os.environ.get("RANK", "0")) != 0:
            return command(args)
        with output_lock(args.output):
            return command(args)

    return run


def _os_error_message(error: OSError) -> str:
    paths = [str(path) for path in (error.filename, error.filename2) if path is not None]
    if not paths:
        return str(error).replace("\n", " ").strip() or type(error).__name__
    reason = error.strerror or type(error).__name__
    code = f" (errno {error.errno})" if error.errno else ""
    return (
        f"{' -> '.join(paths)}: {reason}{code}; choose a path you can write to (a folder on a writable disk "
        "with free space), or fix its permissions."
    )


COMMANDS = {
    "quickstart": _cmd_quickstart,
    "run": _cmd_run,
    "pretrain": _locked(_cmd_pretrain),
    "finetune": _locked(_cmd_finetune),
    "evaluate": _cmd_evaluate,
}


def _end_process_group() -> None:
    """Destroy the process group of a ``torchrun`` / ``accelerate launch`` run, if there is one.

    torch does not do it at exit, and a gloo group left alive meets the interpreter's teardown with its
    worker threads running: a process whose work is done can then abort (SIGABRT, "terminate called
    without an active exception") and fail the whole launch (pytorch/pytorch#190489). Without torch
    imported there is no group, and nothing to import.
    """
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return COMMANDS[args.command](args)
    except NonFiniteLossError as error:
        if args.debug:
            raise
        # A leading newline: training stops mid progress bar, whose line has no newline yet.
        print(f"\nretromae-st: training stopped: {error}", file=sys.stderr)
        return EXIT_TRAINING_FAILED
    except (UserInputError, FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError) as error:
        # ValueError: the loss's and the libraries' option checks; all name the offending value.
        if args.debug:
            raise
        message = str(error).replace("\n", " ").strip() or type(error).__name__
        print(f"retromae-st: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as error:
        # Any other failure on a path the user gave: a read-only or full disk, no permission, a file where
        # a folder belongs. It names the path; nothing the user can fix deserves a traceback.
        if args.debug:
            raise
        print(f"retromae-st: error: {_os_error_message(error)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except RecursionError:
        # A self-referencing YAML alias (or any input nested beyond Python's stack) in what the user passed.
        if args.debug:
            raise
        source = getattr(args, "recipe", None) or "the input"
        print(
            f"retromae-st: error: {source}: nested too deeply to read (a YAML alias that refers to itself, such "
            "as `a: &x [*x]`?); remove the self-reference.",
            file=sys.stderr,
        )
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("\nretromae-st: interrupted; run the same command again to resume.", file=sys.stderr)
        return 130
    finally:
        _end_process_group()


if __name__ == "__main__":
    sys.exit(main())
