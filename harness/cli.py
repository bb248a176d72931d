"""The `harness` command: train, study, eval, tables and ui subcommands."""

from __future__ import annotations

import argparse
import logging
import os
import sys

# offline at run time and no telemetry, unless the user set these explicitly
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)

log = logging.getLogger("harness")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train one model from a preset and log one MLflow run")
    p.add_argument("preset", help="a preset file (models/sm_t_scfuffn.yaml) or its name (sm_t_scfuffn)")
    p.add_argument("overrides", nargs="*", help="config overrides as key.sub=value, e.g. train.max_steps=200")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the run folder")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")


def _add_study(sub) -> None:
    p = sub.add_parser("study", help="run an Optuna study whose trials are logged as MLflow child runs")
    p.add_argument("study_file", help="a study definition, e.g. studies/default.yaml")
    p.add_argument("overrides", nargs="*", help="overrides of the study file as key.sub=value")
    p.add_argument("--workers", type=int, default=1, help="worker processes sharing the study (default 1)")
    p.add_argument("--worker", action="store_true", help="join an existing study as one worker")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a trained model with lm-eval")
    p.add_argument("source", help="an MLflow run id or a model folder saved with save_pretrained")
    p.add_argument("--tasks", default="corpus_ppl,arc_easy", help="comma-separated task names")
    p.add_argument("--limit", type=int, default=None, help="examples per task (default: all)")
    p.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size")


def _add_tables(sub) -> None:
    p = sub.add_parser("tables", help="write the paper's tables and figures from finished runs")
    p.add_argument("--study", required=True, help="study name whose runs to read")
    p.add_argument("--out", default="results", help="output folder (default results/)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description="Entropy-guided attention research harness")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_study(sub)
    _add_eval(sub)
    _add_tables(sub)
    return parser


def _run(args) -> int:
    if args.command == "train":
        from harness.train import main_train

        return main_train(args.preset, args.overrides, resume=args.resume, print_config=args.print_config)
    if args.command == "study":
        from harness.study import main_study

        return main_study(args.study_file, args.overrides, workers=args.workers, worker=args.worker)
    if args.command == "eval":
        from harness.evaluate import main_eval

        return main_eval(args.source, args.tasks.split(","), limit=args.limit, batch_size=args.batch_size)
    if args.command == "tables":
        from harness.report import main_tables

        return main_tables(args.study, args.out)
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return _run(args)
    except ValueError as err:
        # invalid configs and inputs: one clear line, no traceback
        log.error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
