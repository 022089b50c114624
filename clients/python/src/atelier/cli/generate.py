"""``atelier generate``: images from a prompt, with a progress bar over the steps."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from atelier.cli.output import err, out, print_json, progress_bar
from atelier.client.generation import GenerationClient, parse_adapter
from atelier.client.media import save_images


def register(commands) -> None:
    gen = commands.add_parser(
        "generate", help="generate images from a prompt",
        description="Generate images for PROMPT, show progress over the denoising steps, "
                    "and save them to --out as <stem>-<i>.<ext>.")
    gen.add_argument("prompt", help='e.g. "a photo of sks dog on the moon"')
    gen.add_argument("--model", default="", help="models/<id> or <id> (server default)")
    gen.add_argument("-n", "--num-images", type=int, default=1, help="images (default 1)")
    gen.add_argument("-o", "--out", type=Path, default=Path("."),
                     help="folder to save the images in (default .)")
    gen.add_argument("--negative", default="", help="negative prompt")
    gen.add_argument("--steps", type=int, default=0, help="denoising steps (server default)")
    gen.add_argument("--guidance", type=float,
                     help="guidance scale (the model's default: 7.5 SD, 4 klein base)")
    gen.add_argument("--seed", type=int, help="seed of the first image (next ones +1)")
    gen.add_argument("--width", type=int, default=0, help="px, multiple of 8 (klein: 16)")
    gen.add_argument("--height", type=int, default=0, help="px, multiple of 8 (klein: 16)")
    gen.add_argument("--scheduler", default="", help="ddim, pndm, euler, euler_ancestral, "
                     "dpmpp_2m or unipc (the model's own by default)")
    gen.add_argument("--init-image", type=Path, help="image to image: the picture to start from")
    gen.add_argument("--mask", type=Path, help="inpainting: white repaints (needs --init-image)")
    gen.add_argument("--strength", type=float,
                     help="with --init-image, in (0, 1] (server default 0.8, inpainting 1.0)")
    gen.add_argument("--reference", dest="reference_images", action="append", default=[],
                     type=Path, metavar="PATH",
                     help="a reference image (FLUX.2 [klein]: this subject, style or scene); "
                          "repeatable")
    gen.add_argument("--lora", dest="adapters", action="append", default=[], type=_adapter,
                     metavar="NAME[:SCALE]",
                     help="apply a LoRA model over the base, scale 0..2 (default 1); "
                          "repeatable, e.g. --lora sks-dog --lora ink-style:0.6")
    gen.add_argument("--candidates", dest="num_candidates", type=int,
                     help="best of N: generate N and keep the -n most like the model's "
                          "subject (a fine-tuned model)")
    gen.add_argument("--format", dest="output_format", choices=["png", "jpeg", "webp"],
                     help="image format (png)")
    gen.add_argument("--stem", help="file name stem (default: from the prompt)")
    gen.set_defaults(run=run)


def _adapter(text: str) -> tuple[str, float]:
    try:
        return parse_adapter(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _stem(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48] or "image"


def run(args: argparse.Namespace, connect) -> int:
    fields = dict(model=args.model, num_images=args.num_images, negative_prompt=args.negative,
                  steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                  width=args.width, height=args.height, scheduler=args.scheduler,
                  output_format=args.output_format, init_image=args.init_image,
                  mask_image=args.mask, strength=args.strength, adapters=args.adapters,
                  num_candidates=args.num_candidates, reference_images=args.reference_images)
    result = None
    with GenerationClient(connect("generation")) as client:
        if args.json:
            result = client.generate(args.prompt, **fields)
        else:
            with progress_bar(eta=True) as bar:
                task = bar.add_task("denoising", total=args.steps or None)
                for event in client.generate_stream(args.prompt, **fields):
                    if event.HasField("progress"):
                        bar.update(task, completed=event.progress.step,
                                   total=event.progress.total_steps)
                    elif event.HasField("result"):
                        result = event.result
    paths = save_images(result.images, args.out, args.stem or _stem(args.prompt))
    if args.json:
        print_json({"model": result.model, "seeds": [str(s) for s in result.seeds],
                    "images": [str(p) for p in paths],
                    "subject_similarity": list(result.subject_similarity),
                    "candidates": [{"seed": str(c.seed),
                                    "subject_similarity": c.subject_similarity}
                                   for c in result.candidates],
                    "denoise_seconds": result.denoise_seconds,
                    "decode_seconds": result.decode_seconds})
        return 0
    err.print(f"{result.model}: {len(paths)} image(s), denoise {result.denoise_seconds:.2f} s",
              markup=False)
    similarity = list(result.subject_similarity) or [None] * len(paths)
    for path, seed, score in zip(paths, result.seeds, similarity, strict=True):
        note = f"  subject similarity {score:.4f}" if score is not None else ""
        out.print(f"{path}  seed {seed}{note}", markup=False)
    if result.candidates:
        err.print(f"best {len(paths)} of {len(result.candidates)} candidates", markup=False)
    return 0
