"""What `eval_vlm.py` does: load a model, then describe images, chat, or score a question file.

Every user mistake (a missing file, an empty folder, a corrupt or oversized image, weights that do not
fit or hold NaN, a tokenizer without ChatML's special tokens, a malformed question file, an unusable
--device) ends in one line naming the culprit and exit code 2; sampling flags out of range are refused
by argparse. One broken image among many is reported and the others still run.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys

from ..model.checkpoint import load_with_tokenizer
from ..common import DTYPES, UserError, positive_int, resolve_device
from ..data.dataset import DataError
from .evaluate import evaluate, report
from .generate import SamplingConfig, encode_batch, stream
from ..data.processing import ImageLoadError, load_image
from ..data.prompt import IMAGE_MARKER, PromptError, user_turn
from ..model.weights import WeightsError

DEMO_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo")
DEMO_WEIGHTS = os.path.join(DEMO_DIR, "model", "sft_vlm_128.pth")
SAMPLES_DIR = os.path.join(DEMO_DIR, "samples")
DEMO_NOTE = ("the demo model knows only the synthetic shapes world; about other images it can only speak the "
             "language of shapes (it was trained on nothing else)")


def demo_note(image_sizes) -> str | None:
    """What to tell someone who shows the demo model images that are not shapes scenes (the shapes world
    renders 96 x 96; anything else is a photo or a drawing it never saw), else None."""
    return DEMO_NOTE if any(tuple(size) != (96, 96) for size in image_sizes) else None
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def number(low=None, high=None, low_open=False, integer=False):
    """An argparse type: a finite number in [low, high] (low excluded when low_open); argparse turns a
    refusal into one usage error naming the flag."""
    def parse(text):
        value = int(text) if integer else float(text)
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        if low is not None and (value < low or (low_open and value == low)):
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if low_open else '>='} {low}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{text} must be <= {high}")
        return value
    parse.__name__ = "integer" if integer else "number"  # argparse names it: "invalid number value: 'x'"
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval_vlm.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Ask a vision-language model about images (offline).")
    a = p.add_argument
    a("--weights", default=DEMO_WEIGHTS, help="minivlm checkpoint or MiniMind-V .pth (2025-04 or 2025-02 "
                                              "layout, detected); default: the shipped demo model")
    a("--vision", default=None, help="Hugging Face CLIP folder, or SigLIP2 for a minimind-3v checkpoint (default: "
                                     "the tower saved with the checkpoint)")
    a("--tokenizer", default=None, help="tokenizer.json or folder (default: tokenizer.json beside --weights)")
    a("--images", nargs="+", default=[SAMPLES_DIR], help="image files and/or folders (default: the samples)")
    a("--prompt", default="Describe the image.", help="the question asked about each image")
    a("--question-first", action=argparse.BooleanOptionalAction, default=None,
      help="put the question before the image(s) in the prompt (default: as the checkpoint was trained — "
           "its JSON says so; the demo model asks questions first, MiniMind-V puts images first)")
    a("--multi", action="store_true", help="put all images into one prompt instead of one prompt each")
    a("--chat", action="store_true", help="interactive multi-turn conversation about the (first) image")
    a("--eval", metavar="JSONL", default=None, help="score a held-out question file (MiniMind-V jsonl with "
                                                    "reference answers; qtype/n_objects fields for breakdowns)")
    a("--limit", type=positive_int, default=None, help="with --eval: only the first N questions")
    a("--batch-size", type=positive_int, default=32, help="with --eval: questions answered per batch")
    a("--max-new-tokens", type=positive_int, default=128, help="answer length limit in tokens")
    a("--temperature", type=number(low=0), default=0.0, help="0 = greedy; higher = more random")
    a("--top-p", type=number(low=0, high=1, low_open=True), default=1.0, help="nucleus sampling threshold (1 = off)")
    a("--top-k", type=number(low=0, integer=True), default=0, help="sample among the k most likely tokens (0 = off)")
    a("--repetition-penalty", type=number(low=0, low_open=True), default=1.0, help="> 1 discourages repeating tokens")
    a("--seed", type=int, default=0, help="seed for sampling")
    a("--device", default=None, help="cpu, cuda, … (default: cuda if available)")
    a("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights dtype for inference")
    a("--compile", action="store_true",
      help="decode each answer through one compiled graph per token (torch.compile; needs a C++ compiler on "
           "a CPU): 2.3-4.7x more tokens/s for 26m on a CPU, after a first compile of 10-30 s (not with --eval)")
    a("--num-heads", type=int, default=None,
      help="decoder attention heads, for checkpoints without a minivlm JSON (MiniMind: 8)")
    add_preset_flag(p)
    return p


GENERATIONS = ("26m", "104m", "26m-moe", "3v", "3v-moe")


def add_preset_flag(p: argparse.ArgumentParser):
    p.add_argument("--preset", default=None, choices=GENERATIONS,
                   help="what --weights must be (default: read off the weights: a minimind-3v .pth has "
                        "vision_proj.mlp.* and QK-norm keys); 3v/3v-moe need a SigLIP2 --vision folder and "
                        "minimind-3v's tokenizer, 26m/104m/26m-moe a CLIP folder")


def check_preset(model, preset: str | None, weights: str):
    """--preset as a promise about --weights: a checkpoint of another generation, or dense vs MoE, is refused."""
    if preset is None:
        return
    is_3v, is_moe = model.vlm_config.chat_template == "minimind-3v", model.config.use_moe
    if is_3v != preset.startswith("3v") or is_moe != preset.endswith("moe"):
        what = ("minimind-3v" if is_3v else "MiniMind-V") + (" MoE" if is_moe else " dense")
        raise UserError(f"--preset {preset}: {weights} is a {what} checkpoint")


def collect_images(paths) -> list[str]:
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTS))
            if not found:
                raise UserError(f"{path}: folder holds no images ({', '.join(IMAGE_EXTS)})")
            files += found
        elif os.path.exists(path):
            files.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    return files


def load_model(args):
    """-> (model on its device, tokenizer, device, question_first as trained)."""
    overrides = {"num_attention_heads": args.num_heads} if args.num_heads else {}
    model, tokenizer, question_first = load_with_tokenizer(args.weights, args.tokenizer, args.vision,
                                                           DTYPES[args.dtype], **overrides)  # no fp32 copy first
    check_preset(model, args.preset, args.weights)
    device = resolve_device(args.device)
    return model.to(device=device, dtype=DTYPES[args.dtype]).eval(), tokenizer, device, question_first


def ask(model, tokenizer, images, messages, cfg, out=None, compiled=False) -> str:
    """Stream the answer to `messages` (which hold one <image> per image) to out (default: sys.stdout as
    it is at the call, so a redirected stdout gets it) and return it."""
    out = out or sys.stdout
    batch = encode_batch(model, tokenizer, [(images, messages)])
    pieces = []
    for piece in stream(model, tokenizer, batch["input_ids"], batch["pixel_values"], batch["image_counts"],
                        batch["attention_mask"], cfg=cfg, compiled=compiled):
        out.write(piece)
        out.flush()
        pieces.append(piece)
    out.write("\n")
    return "".join(pieces)


def run(args) -> int:
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                         top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)
    model, tokenizer, device, trained_question_first = load_model(args)
    if args.compile and device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise UserError("--compile: torch.compile needs a C++ compiler on a CPU (no g++, c++ or clang++ on the "
                        "PATH); install one, or drop --compile")
    if args.question_first is None:
        args.question_first = trained_question_first
    print(f"model: {args.weights} ({sum(p.numel() for n, p in model.named_parameters() if not n.startswith('vision_encoder.')) / 1e6:.2f}M "
          f"decoder+projector parameters, {model.run_length} image tokens per image, {device})")

    if args.eval:
        if not os.path.isfile(args.eval):
            raise UserError(f"{args.eval}: eval file not found")
        records, scores = evaluate(model, tokenizer, args.eval, batch_size=args.batch_size, limit=args.limit,
                                   max_new_tokens=min(args.max_new_tokens, 64), question_first=args.question_first)
        print(report(records, scores))
        return 0

    files = collect_images(args.images)
    if len(files) == 1:
        loaded = [(files[0], load_image(files[0]))]  # the only image: its error is the error
    else:
        loaded = []
        for f in files:
            try:
                loaded.append((f, load_image(f)))
            except ImageLoadError as e:
                print(f"skipped: {e}", file=sys.stderr)  # one bad image must not sink the others
        if not loaded:
            raise UserError(f"none of the {len(files)} images could be read")
    if os.path.abspath(args.weights) == DEMO_WEIGHTS and (note := demo_note(im.size for _, im in loaded)):
        print(f"note: {note}")

    if args.chat:
        name, image = loaded[0]
        return chat(model, tokenizer, name, image, args.question_first, cfg, args.compile)

    groups = [loaded] if args.multi else [[item] for item in loaded]
    for group in groups:
        content = user_turn(args.prompt, len(group), args.question_first)  # checked before it is printed
        print(f"[{', '.join(os.path.basename(f) for f, _ in group)}] {args.prompt}")
        print("vlm> ", end="", flush=True)
        ask(model, tokenizer, [im for _, im in group], [{"role": "user", "content": content}], cfg,
            compiled=args.compile)
    return 0


def chat(model, tokenizer, name, image, question_first, cfg, compiled=False) -> int:
    """A conversation about one image, one question per line of stdin; an empty line or end of input ends it."""
    print(f"[chat about {name}; an empty line or Ctrl-D ends]")
    if sys.stdin is None or sys.stdin.closed:  # started with stdin closed (`0<&-`): nothing to read
        return 0
    if hasattr(sys.stdin, "reconfigure"):
        # A byte that is not UTF-8 would make input() raise and end the chat; decoded to a stand-in (a lone
        # surrogate) instead, it reaches user_turn, which refuses that line with a message like any other.
        sys.stdin.reconfigure(errors="surrogateescape")
    messages = []
    while True:
        try:
            question = input("you> ").strip()
        except EOFError:
            break
        except UnicodeDecodeError:  # a stream that cannot be reconfigured: its position is lost
            print("(input that is not UTF-8 text; the chat ends)")
            break
        if not question:
            break
        if messages and IMAGE_MARKER in question:  # the image is placed once, in the first turn
            print(f"(the image is already in this conversation; {IMAGE_MARKER} can only be typed in the "
                  f"first question: ask again without it)")
            continue
        try:  # every turn through user_turn, which checks typed text; the image goes in the first one
            content = user_turn(question, 0 if messages else 1, question_first)
        except PromptError as e:  # e.g. two <image> markers for the one image, or text that is not Unicode
            print(f"({e}; ask again)")
            continue
        messages.append({"role": "user", "content": content})
        print("vlm> ", end="", flush=True)
        messages.append({"role": "assistant", "content": ask(model, tokenizer, [image], messages, cfg,
                                                             compiled=compiled)})
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (UserError, WeightsError, ImageLoadError, DataError, PromptError) as e:  # the user's mistakes;
        print(f"error: {e}", file=sys.stderr)                                      # a bug keeps its traceback
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `python eval_vlm.py | head`: the reader has all it wants
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush cannot fail again
        return 0
    return 2
