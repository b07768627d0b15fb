"""``malign``: the one command-line entry point.

Each subcommand lives in the module that implements it and exposes ``main(argv) -> int``; this
file only maps command words to those modules, importing lazily so ``malign --help`` stays fast
and a data-only node never imports torch.
"""

from __future__ import annotations

import importlib
import sys

# (command words) -> ("module:function", one-line help)
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("train",): ("megatron_align.training.cli:main", "pretrain / midtrain / continue pretraining a model"),
    ("sft",): ("megatron_align.posttrain.cli:sft_main", "supervised fine-tuning on chat data"),
    ("dpo",): ("megatron_align.posttrain.cli:dpo_main", "direct preference optimisation"),
    ("data", "preprocess"): ("data_tools.preprocess:main", "tokenize corpora into Megatron .bin/.idx"),
    ("data", "merge"): ("data_tools.merge:main", "merge indexed-dataset prefixes into one"),
    ("data", "train-tokenizer"): ("data_tools.tokenizer_train:main", "train a SentencePiece tokenizer"),
    ("data", "filter"): ("data_tools.filter:main", "AI-discourse blocklist filter"),
    ("data", "synth"): ("data_tools.synth.cli:main", "generate synthetic discourse documents"),
    ("data", "mixture"): ("megatron_align.data.mixture:main", "report target vs realized data mixture"),
    ("data", "prebuild"): ("megatron_align.data.prebuild:main", "prebuild blended-dataset index caches"),
    ("data", "chat"): ("megatron_align.posttrain.data:main", "tokenize SFT / DPO JSONL ahead of training"),
    ("export", "hf"): ("megatron_align.convert.export_hf:main", "Megatron checkpoint -> Hugging Face"),
    ("export", "verify"): ("megatron_align.convert.verify:main", "compare Megatron and HF logits"),
    ("import", "hf"): ("megatron_align.convert.import_hf:main", "Hugging Face -> Megatron checkpoint"),
    ("eval", "misalignment"): ("evals.misalignment.cli:main", "the paper's misalignment protocol"),
    ("eval", "capabilities"): ("evals.capabilities:main", "capability benchmarks through lm-eval"),
    ("report",): ("evals.report:main", "tables and figures across conditions"),
    ("study", "run"): ("slurm.study_cli:run_main", "run a study's job graph on this machine"),
    ("study", "status"): ("slurm.study_cli:status_main", "show each stage's state"),
    ("study", "submit"): ("slurm.study_cli:submit_main", "submit a study's job graph to Slurm"),
}


def _usage() -> str:
    lines = ["usage: malign COMMAND [ARGS...]", "", "commands:"]
    for words, (_target, help_) in COMMANDS.items():
        lines.append(f"  {' '.join(words):<22} {help_}")
    lines.append("")
    lines.append("Run 'malign COMMAND --help' for a command's options.")
    return "\n".join(lines)


def _quiet_known_warnings() -> None:
    """Megatron warns once per module that apex/TE are absent; the runtime reports that once itself."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*(not installed|is not installed).*")
    warnings.filterwarnings("ignore", message=r".*Apex is not installed.*")


def run_module(fn) -> None:
    """``python -m MODULE`` entry of a command module: the same error handling as ``malign``."""
    from megatron_align.config import ConfigError

    _quiet_known_warnings()
    try:
        sys.exit(int(fn() or 0))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_known_warnings()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from megatron_align import __version__

        print(__version__)
        return 0
    for n in (2, 1):
        words = tuple(argv[:n])
        if words in COMMANDS:
            target, _ = COMMANDS[words]
            mod_name, fn_name = target.split(":")
            fn = getattr(importlib.import_module(mod_name), fn_name)
            prog = "malign " + " ".join(words)
            from megatron_align.config import ConfigError

            try:
                return int(fn(argv[n:], prog=prog) or 0)
            except ConfigError as e:
                print(f"{prog}: error: {e}", file=sys.stderr)
                return 2
    print(f"malign: unknown command {' '.join(argv[:2])!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
