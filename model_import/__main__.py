"""python -m model_import: put the weather classifier into the BentoML model store."""

from __future__ import annotations

import argparse
import logging
import os
import sys

DESCRIPTION = """\
Import the weather classifier into the BentoML model store (at $BENTOML_HOME,
default ~/bentoml) as `weather-torch` (a torch state dict) and `weather-onnx`
(an ONNX model with the preprocessing in the graph).

  python -m model_import --torch-uri gs://bucket/torch_model [--onnx-uri URI]
  TORCH_MODEL_URI=gs://bucket/torch_model python -m model_import
  python -m model_import demo

A URI is gs://BUCKET/OBJECT, file:///path or a local path. Given only the torch
weights, the ONNX model is exported from them. Given both, they must agree.
"""

EPILOG = """\
environment:
  TORCH_MODEL_URI             default for --torch-uri
  ONNX_MODEL_URI              default for --onnx-uri
  GOOGLE_CLOUD_PROJECT        the Google Cloud project for gs:// URIs
  CLOUDSDK_AUTH_ACCESS_TOKEN  a bearer token for gs:// URIs, instead of Application
                              Default Credentials; never stored or logged
  STORAGE_EMULATOR_HOST       talk to a GCS emulator (e.g. http://127.0.0.1:9023)
  BENTOML_HOME                where the model store lives (default ~/bentoml)

The import is all or nothing: on any failure it prints one line and exits 1,
leaving nothing new in the store.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m model_import",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--torch-uri", default=os.environ.get("TORCH_MODEL_URI"), help="torch state dict (default $TORCH_MODEL_URI)"
    )
    parser.add_argument(
        "--onnx-uri", default=os.environ.get("ONNX_MODEL_URI"), help="ONNX model (default $ONNX_MODEL_URI)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser(
        "demo",
        help="build (or reuse) the embedded demo model and import it",
        description="Train the demo model on synthetic images (about 2 minutes, cached), then import it.",
    )
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)

    from model_import.errors import ImportFailure
    from weather.demo import DemoFailed

    try:
        if args.command == "demo":
            models = _import_demo()
        elif args.torch_uri or args.onnx_uri:
            from model_import.importer import import_models

            models = import_models(args.torch_uri, args.onnx_uri)
        else:
            parser.print_usage(sys.stderr)
            print(
                "error: give --torch-uri/--onnx-uri (or set TORCH_MODEL_URI/ONNX_MODEL_URI), or run `demo`",
                file=sys.stderr,
            )
            return 2
    except (ImportFailure, DemoFailed) as failure:
        print(f"model_import: error: {failure}", file=sys.stderr)
        return 1
    import bentoml

    for model in models:
        print(f"{model.tag}  {bentoml.models.get(model.tag).path}")
    return 0


def _import_demo():
    from model_import.importer import import_models
    from weather.demo import build_demo

    demo = build_demo()
    return import_models(demo.state_dict_path.as_uri(), demo.onnx_path.as_uri(), extra_metadata=demo.metadata())


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="model_import: %(message)s")
    # Libraries that narrate their internals at INFO.
    for name in ("onnxscript", "onnx_ir", "torch", "bentoml", "urllib3", "google"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
