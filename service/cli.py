"""``bagserve`` command line: ``serve`` the models, ``export`` one as ONNX / Triton,
``quantize`` one into a smaller storage dtype."""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def _add_table_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="table checkpoint (.safetensors, .npy, "
                        ".npz, .pt, .pth, .bin)")
    parser.add_argument("--tensor", help="tensor name inside the checkpoint, when it holds "
                        "several")
    parser.add_argument("--mode", default="mean", choices=["sum", "mean", "max"],
                        help="pooling")
    parser.add_argument("--padding-idx", type=int, default=None,
                        help="row id whose occurrences are skipped (default: none)")
    parser.add_argument("--max-norm", type=float, default=None,
                        help="renormalise rows whose norm exceeds this (default: none)")
    parser.add_argument("--norm-type", type=float, default=2.0, help="p of the max-norm norm")
    parser.add_argument("--include-last-offset", action="store_true",
                        help="offsets input holds B+1 entries, the last equal to len(indices)")


def _export(args: argparse.Namespace) -> int:
    from models import EmbeddingBag
    from models.export import export_onnx, export_triton

    bag = EmbeddingBag.from_checkpoint(args.checkpoint, args.tensor, mode=args.mode,
                                       padding_idx=args.padding_idx, max_norm=args.max_norm,
                                       norm_type=args.norm_type,
                                       include_last_offset=args.include_last_offset)
    table_dtype = "float16" if args.fp16 else None
    if args.output is not None:
        path = export_onnx(bag, args.output, weighted=args.weighted, table_dtype=table_dtype)
        print(f"wrote {path}")
    if args.triton_repository is not None:
        name = args.name or args.checkpoint.stem
        folder = export_triton(bag, args.triton_repository, name, weighted=args.weighted,
                               table_dtype=table_dtype)
        print(f"wrote Triton model {folder}")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from models import load_table
    from models.quantize import quantize_checkpoint

    output: Path = args.output
    if output.suffix.lower() != ".safetensors":
        raise ValueError(f"--output must be a .safetensors file; got {str(output)!r}")
    if not output.parent.is_dir():
        raise ValueError(f"--output: folder {str(output.parent)!r} does not exist")
    if args.bags < 1:
        raise ValueError(f"--bags must be at least 1; got {args.bags}")
    if not args.bag_length > 0:
        raise ValueError(f"--bag-length must be a positive number; got {args.bag_length}")
    source = load_table(args.checkpoint, args.tensor)
    stored, fields, result = quantize_checkpoint(
        source, args.dtype, output, mode=args.mode, bags=args.bags,
        mean_length=args.bag_length, seed=args.seed)
    ratio = stored.nbytes / source.nbytes
    print(f"wrote {output}: {stored.rows:,} x {stored.dim} as {stored.storage}, "
          f"{stored.nbytes:,} bytes ({ratio:.2f}x float32's {source.nbytes:,})")
    print(f"accuracy on {result.bags} sampled bags (mode {result.mode}, ~{args.bag_length:g} "
          f"ids each) against float32:")
    print(f"  max abs error   {result.max_abs_error:.3g}")
    print(f"  mean abs error  {result.mean_abs_error:.3g}")
    print(f"  cosine          mean {result.mean_cosine:.6f}, min {result.min_cosine:.6f}")
    # Ready to paste: a valid name, the absolute path (configs resolve relative paths
    # against their own folder), and the mode the accuracy was measured with.
    name = re.sub(r"[^A-Za-z0-9._-]", "-", output.stem).lstrip("._-") or "model"
    print("serve it with:\n  [[models]]")
    print(f'  name = "{name[:128]}"')
    print(f'  checkpoint = "{output.resolve()}"')
    print(f'  mode = "{args.mode}"')
    for key, value in fields.items():
        print(f'  {key} = "{value}"')
    return 0


def _serve(args: argparse.Namespace) -> int:
    from service.settings import Settings

    overrides = {key: getattr(args, key) for key in ("config", "host", "port", "workers")
                 if getattr(args, key) is not None}
    try:
        settings = Settings(**overrides)
    except ValueError as exc:
        print(f"bagserve serve: invalid settings: {exc}", file=sys.stderr)
        return 2
    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Before prometheus_client is imported (service.server imports it): the workers'
        # metrics then live in files every scrape adds up.
        folder = tempfile.mkdtemp(prefix="bagserve-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
        try:
            return _serve_with(settings)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return _serve_with(settings)


def _serve_with(settings: Any) -> int:
    from service.config import DEMO, ConfigError, load_config
    from service.heap import keep_batch_buffers
    from service.logs import configure_logging
    from service.registry import ModelLoadError, load_model
    from service.server import run_single, run_workers

    configure_logging(settings.log_level, settings.log_format)
    keep_batch_buffers()
    try:
        specs = load_config(settings.config) if settings.config else [DEMO]
        if settings.workers > 1:
            # Workers load their own models after the fork (see service.server); a bad
            # checkpoint makes them fail start-up, and the pool exits 2.
            return run_workers(settings, specs, settings.workers)
        # Load before binding the port: a bad checkpoint stops start-up with its name.
        models = [load_model(spec) for spec in specs]
    except (ConfigError, ModelLoadError) as exc:
        print(f"bagserve serve: error: {exc}", file=sys.stderr)
        return 2
    return run_single(settings, models)


def _ready(args: argparse.Namespace) -> int:
    """Exit 0 when the local server answers ready (the container HEALTHCHECK)."""
    import os
    import urllib.error
    import urllib.request

    port = args.port or int(os.environ.get("BAGSERVE_PORT", "8000"))
    url = f"http://127.0.0.1:{port}/v2/health/ready"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:
            ready = response.status == 200
    except (urllib.error.URLError, OSError) as exc:
        print(f"bagserve ready: {url}: {exc}", file=sys.stderr)
        return 1
    return 0 if ready else 1


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Options show their defaults (unless unset or already named); epilogs keep their
    line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False  # 0 is a default
        if (not unset and action.default != argparse.SUPPRESS and "default" not in text
                and action.option_strings):
            text += " (default: %(default)s)"
        return text


def settings_help() -> str:
    """Every setting with its environment variable, default and description, generated from
    :class:`service.settings.Settings` (so the help cannot drift from it)."""
    from service.settings import Settings

    lines = ["settings (flags above override these environment variables):"]
    for name, field in Settings.model_fields.items():
        default = "none" if field.default is None else repr(field.default)
        lines.append(f"  BAGSERVE_{name.upper()} (default {default})")
        lines.append(f"      {field.description}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bagserve", description="Serve torch.nn.EmbeddingBag "
                                     "tables over HTTP, without PyTorch.",
                                     formatter_class=_Formatter)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the configured models (or the built-in "
                                "demo model) over HTTP", formatter_class=_Formatter,
                                epilog=settings_help())
    serve.add_argument("--config", type=Path, default=None,
                       help="TOML file of [[models]] (env BAGSERVE_CONFIG); default: demo")
    serve.add_argument("--host", default=None, help="listen address (env BAGSERVE_HOST; "
                       "default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="listen port (env "
                       "BAGSERVE_PORT; default 8000)")
    serve.add_argument("--workers", default=None, help="server processes sharing the port "
                       "and the memory-mapped tables, or 'auto': one per usable core (env "
                       "BAGSERVE_WORKERS; default 1)")
    serve.set_defaults(handler=_serve)
    ready = commands.add_parser("ready", help="exit 0 if the local server is ready "
                                "(for container health checks)", formatter_class=_Formatter)
    ready.add_argument("--port", type=int, default=None, help="default: BAGSERVE_PORT or 8000")
    ready.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the "
                       "answer")
    ready.set_defaults(handler=_ready)
    export = commands.add_parser("export", help="write a standalone ONNX model and/or a "
                                 "Triton model repository", formatter_class=_Formatter)
    _add_table_options(export)
    export.add_argument("--output", "-o", type=Path, help="the .onnx file to write")
    export.add_argument("--triton-repository", type=Path,
                        help="write <dir>/<name>/config.pbtxt and <name>/1/model.onnx")
    export.add_argument("--name", help="Triton model name (default: the checkpoint's stem)")
    export.add_argument("--weighted", action="store_true",
                        help="add the per_sample_weights input (mode sum only)")
    export.add_argument("--fp16", action="store_true", help="store the table as float16")
    export.set_defaults(handler=_export)
    quantize = commands.add_parser(
        "quantize", help="store a float checkpoint as int8, int4, float16 or bfloat16 "
        "(safetensors) and print what it costs in accuracy", formatter_class=_Formatter)
    quantize.add_argument("checkpoint", type=Path, help="float table checkpoint "
                          "(.safetensors, .npy, .npz, .pt, .pth, .bin)")
    quantize.add_argument("--tensor", help="tensor name inside the checkpoint, when it holds "
                          "several")
    quantize.add_argument("--dtype", required=True,
                          choices=["int8", "int4", "float16", "bfloat16"],
                          help="storage dtype to write")
    quantize.add_argument("--output", "-o", type=Path, required=True,
                          help="the .safetensors file to write")
    quantize.add_argument("--mode", default="mean", choices=["sum", "mean", "max"],
                          help="pooling of the sampled bags the accuracy is measured on")
    quantize.add_argument("--bags", type=int, default=1000, help="bags sampled")
    quantize.add_argument("--bag-length", type=float, default=20.0,
                          help="mean ids per sampled bag (Poisson lengths)")
    quantize.add_argument("--seed", type=int, default=0, help="seed of the sampled bags")
    quantize.set_defaults(handler=_quantize)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bagserve`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "export" and args.output is None and args.triton_repository is None:
        parser.error("export needs --output and/or --triton-repository")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        status: int = args.handler(args)
    except (ValueError, OSError) as exc:  # bad files or options: a message, no traceback
        # Library messages name the Python keyword; here it is a flag.
        message = str(exc).replace("pass tensor=NAME", "pass --tensor NAME")
        print(f"bagserve {args.command}: error: {message}", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
