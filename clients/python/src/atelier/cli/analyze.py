"""``atelier analyze``: ask about images, document pages, charts or a video."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from atelier.cli.output import err, out, print_json
from atelier.client.analysis import AnalysisClient
from atelier.client.enums import short_name, short_names
from atelier.v1 import analysis_pb2 as A

_VIDEO_SUFFIXES = {".mp4", ".webm", ".mkv", ".mov", ".avi"}


def register(commands) -> None:
    an = commands.add_parser(
        "analyze", help="answer a question about images, documents, charts or a video",
        description="Analyze FILES (images or document-page images; or one video) and print "
                    "the answer, or write it to --output.")
    an.add_argument("files", nargs="+", type=Path, help="image files, or one video file")
    an.add_argument("-q", "--instruction", default="",
                    help="the question or instruction (the task's default if unset)")
    an.add_argument("--task", default="vqa",
                    choices=short_names(A.AnalysisTask, "ANALYSIS_TASK_"),
                    help="what kind of analysis (default vqa; video files imply video)")
    an.add_argument("--format", dest="output_format",
                    choices=short_names(A.OutputFormat, "OUTPUT_FORMAT_"),
                    help="answer format (the task's default)")
    an.add_argument("--schema", type=Path, help="JSON Schema file the JSON answer must match")
    an.add_argument("--language", default="", help="answer language (BCP-47), e.g. de")
    an.add_argument("--max-new-tokens", type=int, default=0, help="answer length cap, tokens")
    an.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    an.add_argument("--seed", type=int, help="sampling seed")
    an.add_argument("--fps", type=float, default=0, help="video frames sampled per second")
    an.add_argument("-o", "--output", type=Path, help="write the answer to this file")
    an.add_argument("--stream", action="store_true", help="print the answer as it is decoded")
    an.set_defaults(run=run)


def run(args: argparse.Namespace, connect) -> int:
    videos = [f for f in args.files if f.suffix.lower() in _VIDEO_SUFFIXES]
    if videos and len(args.files) > 1:
        raise ValueError("give one video file, or image files only")
    for path in args.files:
        if not path.is_file():
            raise ValueError(f"no such file: {path}")
    fields = dict(
        instruction=args.instruction, task="video" if videos else args.task,
        output_format=args.output_format, target_language=args.language,
        json_schema=json.loads(args.schema.read_text()) if args.schema else None,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    if videos:
        from atelier.client.media import video_input

        fields["video"] = video_input(videos[0], fps=args.fps)
        images = []
    else:
        images = args.files
    with AnalysisClient(connect("analysis")) as client:
        if args.stream and not args.json:
            reply = None
            for event in client.analyze_stream(images, **fields):
                if event.HasField("delta") and not args.output:
                    out.print(event.delta, end="", markup=False)
                elif event.HasField("result"):
                    reply = event.result
            if not args.output:
                out.print()
        else:
            reply = client.analyze(images, **fields)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(reply.text + "\n")
    if args.json:
        print_json(reply)
    elif args.output:
        err.print(f"wrote {args.output}", markup=False)
    elif not args.stream:
        out.print(reply.text, markup=False)
    if not args.json:
        u = reply.usage
        err.print(f"{short_name(A.OutputFormat, reply.output_format, 'OUTPUT_FORMAT_')}, "
                  f"{u.completion_tokens} tokens ({u.image_tokens} image tokens in), "
                  f"ttft {reply.time_to_first_token_seconds:.2f} s, finish "
                  f"{short_name(A.FinishReason, reply.finish_reason, 'FINISH_REASON_')}",
                  markup=False)
    return 0
