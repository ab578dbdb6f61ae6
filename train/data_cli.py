"""`qwen2-train prepare SRC... --out DIR`: the command-line front of `train.data_prepare.prepare`.

Exit codes: 0 success; 2 bad input or usage (one line on stderr, no traceback); 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import sys

from train.data_prepare import DEFAULT_EVAL_FRACTION, prepare

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints the whole usage; we keep errors to one line
        raise _UsageError(f"{self.prog}: {message}")


class _UsageError(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="qwen2-train prepare",
        description="Tokenize .txt / .jsonl files with the Qwen2 tokenizer into packed int32 token shards "
        "(documents separated by <|endoftext|>, rows of --seq-len tokens, a held-out split).",
    )
    parser.add_argument(
        "sources",
        nargs="+",
        metavar="SRC",
        help=".txt file (one document), .jsonl file (one document per line) or a directory of them",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (created atomically)")
    parser.add_argument("--seq-len", type=int, required=True, metavar="N", help="tokens per training sequence")
    held_out = parser.add_mutually_exclusive_group()
    held_out.add_argument(
        "--eval-fraction",
        type=float,
        default=DEFAULT_EVAL_FRACTION,
        metavar="F",
        help=f"share of sequences held out for evaluation (default {DEFAULT_EVAL_FRACTION})",
    )
    held_out.add_argument("--eval-sequences", type=int, metavar="N", help="exact number of held-out sequences")
    parser.add_argument(
        "--workers", type=int, default=None, metavar="N", help="tokenizing processes (default: all CPUs)"
    )
    parser.add_argument("--text-key", default="text", metavar="KEY", help='JSONL field with the text (default "text")')
    parser.add_argument(
        "--tokenizer",
        default=None,
        metavar="DIR",
        help="directory with tokenizer.json (default: the Qwen2 tokenizer, built offline)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing prepared directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def prepare_main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        meta = prepare(
            args.sources,
            args.out,
            seq_len=args.seq_len,
            eval_fraction=args.eval_fraction,
            eval_sequences=args.eval_sequences,
            text_key=args.text_key,
            tokenizer_dir=args.tokenizer,
            num_workers=args.workers,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    except (_UsageError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except SystemExit as exit_request:  # --help
        return int(exit_request.code or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILURE
    splits = meta["splits"]
    print(
        json.dumps(
            {
                "out": str(args.out),
                "documents": meta["documents"],
                "tokens": meta["tokens"],
                "train_sequences": splits["train"]["sequences"],
                "eval_sequences": splits["eval"]["sequences"],
                "seq_len": meta["seq_len"],
            }
        )
    )
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(prepare_main())
