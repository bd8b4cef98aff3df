"""`python -m jclip.convert`: jclip checkpoints to and from PyTorch formats, and params-only exports.

  params    a training checkpoint -> a params-only export (no optimizer state), for `config.init_from`
  openclip  a training checkpoint or params export -> an OpenCLIP folder (`local-dir:` loadable)
  hf        a training checkpoint or params export -> a transformers CLIPModel folder
  import    an OpenCLIP/OpenAI state dict or folder, or a transformers CLIPModel folder -> a params export

Runs on the CPU; PyTorch is not needed for any of it. LoRA adapters (jclip.models.lora) are merged into the
weights by every export: the exported model config has no `model.lora`. Every source and output may be a
gs:// URL (PyTorch-format files are staged in a temporary local folder and copied).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

from jclip import paths
from jclip.convert.params_io import HostModel
from jclip.data.ops.image import CLIP_MEAN, CLIP_STD


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jclip.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def with_checkpoint(name: str, help_text: str) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--checkpoint", required=True,
                             help="a workdir, its checkpoints/ folder, a step folder, or a params export")
        command.add_argument("--step", type=int, default=None, help="training step (default: the latest)")
        command.add_argument("--output", required=True, help="a new folder")
        return command

    with_checkpoint("params", "training checkpoint -> params-only export")
    to_openclip = with_checkpoint("openclip", "-> OpenCLIP state dict + open_clip_config.json")
    to_openclip.add_argument("--weights", choices=("safetensors", "pt"), default="safetensors")
    to_hf = with_checkpoint("hf", "-> transformers CLIPModel folder")
    to_hf.add_argument("--drop_logit_bias", action="store_true",
                       help="export a sigmoid-loss model's towers and scale without its logit bias")
    for command in (to_openclip, to_hf):
        command.add_argument("--drop_prototype_heads", action="store_true",
                             help="export an nCLIP/xCLIP model's towers without its prototype heads")

    importer = commands.add_parser("import", help="PyTorch weights -> params export")
    importer.add_argument("--source", required=True, help="state dict file (.safetensors/.pt/.bin/.pth), "
                          "OpenCLIP folder, or transformers CLIPModel folder")
    importer.add_argument("--output", required=True, help="a new folder")
    importer.add_argument("--openclip_config", default=None, help="OpenCLIP model config JSON of a bare state dict")
    importer.add_argument("--preset", default=None, help="jclip model preset of a bare state dict (e.g. B/32)")
    importer.add_argument("--quick_gelu", type=_bool, default=None,
                          help="the activation of a bare state dict: true for OpenAI's weights")
    importer.add_argument("--head_width", type=int, default=64,
                          help="attention head width when the architecture is read off the weights")
    return parser


def _describe(model: HostModel) -> str:
    count = sum(int(value.size) for value in model.params.values())
    vision, text = model.model_config["vision"], model.model_config["text"]
    return (f"{count:,} parameters; image {vision['image_size']}px patch {vision['patch_size']} width "
            f"{vision['width']} x {vision['layers']} layers; text width {text['width']} x {text['layers']} "
            f"layers, context {text['context_length']}; quick_gelu={model.model_config.get('quick_gelu', False)}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from jclip.convert import formats, params_io

    started = time.perf_counter()
    try:
        if args.command == "import":
            with contextlib.ExitStack() as downloads:
                source = downloads.enter_context(paths.local_copy(args.source))
                openclip_config = (None if args.openclip_config is None
                                   else downloads.enter_context(paths.local_copy(args.openclip_config)))
                model = formats.import_model(source, openclip_config=openclip_config, preset=args.preset,
                                             quick_gelu=args.quick_gelu, head_width=args.head_width)
            print(f"read {args.source}: {_describe(model)}", flush=True)
            if (model.preprocessing["mean"], model.preprocessing["std"]) != (list(CLIP_MEAN), list(CLIP_STD)):
                print(f"note: the source normalises images with mean {model.preprocessing['mean']} and std "
                      f"{model.preprocessing['std']}; jclip's input pipeline uses CLIP's {list(CLIP_MEAN)} and "
                      f"{list(CLIP_STD)}", file=sys.stderr)
            written = params_io.write(args.output, model, {"imported_from": str(paths.as_path(args.source))})
        else:
            model = params_io.read(args.checkpoint, args.step)
            print(f"read {args.checkpoint}: {_describe(model)}", flush=True)
            lora = model.model_config.get("lora")
            if lora:
                model = params_io.without_lora(model)
                print(f"merged the LoRA adapters (rank {lora['rank']}, alpha {lora['alpha']}, "
                      f"{'/'.join(lora['targets'])}) into the weights: {_describe(model)}", flush=True)
            if args.command == "params":
                written = params_io.write(args.output, model, {"checkpoint": str(paths.as_path(args.checkpoint)),
                                                               "step": args.step})
            else:
                with paths.local_output(args.output) as staged:
                    if args.command == "openclip":
                        written = formats.export_openclip(model, staged, weights=args.weights,
                                                          drop_prototype_heads=args.drop_prototype_heads)
                    else:
                        written = formats.export_hf(model, staged, drop_logit_bias=args.drop_logit_bias,
                                                    drop_prototype_heads=args.drop_prototype_heads)
                    written = paths.as_written(written, staged, args.output) if paths.is_url(args.output) else written
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as error:
        print(f"jclip.convert: {error}", file=sys.stderr)
        return 2
    print(f"wrote {written} in {time.perf_counter() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
