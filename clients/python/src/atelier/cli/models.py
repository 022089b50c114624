"""``atelier models``: the models the generation service can serve."""

from __future__ import annotations

import argparse

from rich.table import Table

from atelier.cli.output import as_dict, out, print_json, print_table
from atelier.client.enums import short_name, short_names
from atelier.client.generation import GenerationClient
from atelier.v1 import model_pb2


def register(commands) -> None:
    models = commands.add_parser("models", help="base and fine-tuned models",
                                 description="Models of the generation service.")
    sub = models.add_subparsers(dest="models_command", required=True, metavar="COMMAND")
    ls = sub.add_parser("list", help="list models",
                        description="List base models and the subjects fine-tuned by training.")
    ls.add_argument("--kind", choices=short_names(model_pb2.ModelKind, "MODEL_KIND_"),
                    help="only models of this kind")
    ls.set_defaults(run=run_list)
    get = sub.add_parser("get", help="show one model", description="Show one model.")
    get.add_argument("model", help="models/<id> or <id>")
    get.set_defaults(run=run_get)
    delete = sub.add_parser("delete", help="delete a fine-tuned model",
                            description="Delete a fine-tuned model's manifest and weights.")
    delete.add_argument("model", help="models/<id> or <id>")
    delete.set_defaults(run=run_delete)


_COLUMNS = ("name", "kind", "base", "token", "dino", "loaded")


def _row(model: model_pb2.Model) -> list[str]:
    return [model.name, short_name(model_pb2.ModelKind, model.kind, "MODEL_KIND_"),
            model.base_model or "-", model.identifier_token or "-",
            f"{model.scores.dino:.4f}" if model.HasField("scores") else "-",
            short_name(model_pb2.ModelLoadState, model.load_state, "MODEL_LOAD_STATE_")]


def run_list(args: argparse.Namespace, connect) -> int:
    with GenerationClient(connect("generation")) as client:
        found = list(client.list_models(kind=args.kind))
    if args.json:
        print_json({"models": [as_dict(m) for m in found]})
        return 0
    table = Table(*_COLUMNS, box=None)
    for model in found:
        table.add_row(*_row(model))
    print_table(table)
    return 0


def run_get(args: argparse.Namespace, connect) -> int:
    with GenerationClient(connect("generation")) as client:
        model = client.get_model(args.model)
    if args.json:
        print_json(model)
    else:
        for label, value in zip(_COLUMNS, _row(model), strict=True):
            out.print(f"{label:<7} {value}", markup=False)
        if model.HasField("scores"):
            s = model.scores
            out.print(f"scores  step {s.step}: dino {s.dino:.4f}  clip-i {s.clip_i:.4f}  "
                      f"clip-t {s.clip_t:.4f}  drift {s.drift:.4f}", markup=False)
    return 0


def run_delete(args: argparse.Namespace, connect) -> int:
    with GenerationClient(connect("generation")) as client:
        removed = client.delete_model(args.model)
    if args.json:
        print_json({"model": args.model, "deleted_objects": removed})
    else:
        out.print(f"deleted {args.model} ({removed} objects)", markup=False)
    return 0
