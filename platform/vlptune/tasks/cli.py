"""``vlptune caption CHECKPOINT [--beam N] [--split val] [--limit K]``: captions from a trained checkpoint.

Registered in :data:`vlptune.cli.COMMAND_MODULES` as ``vlptune.tasks.cli``.
"""

from __future__ import annotations

import argparse

from vlptune.config.tasks import CaptionConfig

DEFAULTS = CaptionConfig()


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    caption = subparsers.add_parser(
        "caption",
        help="caption images with a checkpoint trained with the captioning objective, and score object/colour mentions",
        description="Load CHECKPOINT (a checkpoint directory, or a run directory: its latest checkpoint; the recipe is the run's "
        "recipe.yaml), caption the first --limit images of --split with greedy (--beam 1) or beam search, and print the "
        "mention accuracy: the share of captions whose mentioned shapes and colours are all in the image, next to the same "
        "number for the ground-truth captions and for another image's captions.",
    )
    caption.add_argument("checkpoint", help="checkpoint directory (RUN/checkpoints/step_N) or run directory")
    caption.add_argument("--beam", type=_positive_int, default=DEFAULTS.beam, help=f"beam size; 1 = greedy (default {DEFAULTS.beam})")
    caption.add_argument("--split", default=None, help="data split to caption (default: the recipe's data.val_split)")
    caption.add_argument("--limit", type=_positive_int, default=DEFAULTS.limit, help=f"images to caption (default {DEFAULTS.limit})")
    caption.add_argument("--max-len", type=_positive_int, default=None, help="most tokens per caption, [CLS] and [SEP] included (default: data.max_text_len)")
    caption.add_argument(
        "--length-penalty",
        type=float,
        default=DEFAULTS.length_penalty,
        help=f"beam ranking: total log-probability / length**penalty (default {DEFAULTS.length_penalty}: mean per token)",
    )
    caption.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run (default auto)")
    caption.add_argument("--show", type=int, default=DEFAULTS.show, help=f"example captions printed (default {DEFAULTS.show})")
    caption.add_argument("--out", help="also write every caption as JSON lines to this file")
    caption.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from vlptune.tasks.caption import run_caption  # torch and the model: only when the command runs

    return run_caption(args)
