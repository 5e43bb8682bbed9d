"""The ``weakclip`` command. Every subcommand is a thin layer over the library functions it names.

Bad input ends with one line ``weakclip: error: <file or key>: <problem>`` and exit status 2; an
interrupted long command says how to resume it (exit status 130).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import WeakclipError


def _add_config(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="shipped config name (see `weakclip configs`) or a .yaml file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.iters=100 --set data.root=/data/VOC2012")


def _add_shard(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shard", metavar="I/N",
                   help="do share I of N of the list (0-based), e.g. one job of a job array per share; any mix "
                        "of shards, process counts and reruns fills the one --output folder")
    _add_reset(p, "this command's outputs in --output")


def _add_reset(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--reset", action="store_true",
                   help=f"discard {what} written with other settings (never other files); without it such a "
                        "folder is refused, naming the settings that differ")


def _config(args):
    from .config import load_config

    return load_config(args.config, args.overrides)


def cmd_configs(args) -> None:
    from .config import list_configs

    print("\n".join(list_configs()))


def cmd_info(args) -> None:
    from .model import build_architecture

    cfg = _config(args)
    model = build_architecture(cfg.model, cfg.data.class_names)
    print(json.dumps({"config": cfg.name, "clip": cfg.model.clip.model, "backbone": type(model.visual).__name__,
                      "co_attention": cfg.model.co_attention.type, "num_classes": cfg.num_classes,
                      "parameters": model.param_counts()}, indent=2))


def cmd_parts(args) -> None:
    from .backbones import BACKBONES
    from .coattention import CO_ATTENTION

    for registry in (BACKBONES, CO_ATTENTION):
        print(f"{registry.what}:")
        for name in registry.names():
            print(f"  {name:<14} {registry.describe(name)}")


def cmd_train(args) -> None:
    from .train import train

    final = train(_config(args), args.output, resume=args.resume, reset=args.reset)
    print(f"weights: {final}")


def _shard(args):
    from .distributed import Shard

    return Shard.parse(args.shard) if args.shard else None


def _done_line(what: str, summary: dict) -> str:
    line = f"{what}: {summary['output']} ({summary['written']} written, {summary['skipped']} already done)"
    if summary.get("missing"):
        line += f"; {summary['missing']} images of the list are left to the other shards"
    if summary.get("other_class_pixels"):
        line += (f"; {summary['other_class_pixels']} pixels won by checkpoint classes outside the config were "
                 f"written as 255")
    return line


def cmd_pseudo_masks(args) -> None:
    from .jobs import pseudo_masks

    summary = pseudo_masks(_config(args), args.checkpoint, args.output, split=args.split,
                           save_probs=args.save_probs, shard=_shard(args), reset=args.reset)
    if summary is not None:
        print(_done_line("pseudo masks", summary))


def cmd_seeds(args) -> None:
    from .seeds import write_seeds

    summary = write_seeds(_config(args), args.output, split=args.split, keep_cams=args.save_cams, shard=_shard(args),
                          reset=args.reset)
    if summary is not None:
        print(_done_line("seeds", summary))


def _read_ids(path: str | None) -> list[str] | None:
    """Ids from a list file (first word of each non-empty line), or None when no file is given."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise WeakclipError(f"{path}: list file not found")
    return [line.split()[0] for line in Path(path).read_text().splitlines() if line.strip()]


def cmd_evaluate(args) -> None:
    from .fileio import write_text_atomic
    from .metrics import evaluate_dirs, save_plots
    from .report import build_report, protocol_card

    cfg = _config(args)
    ids = _read_ids(args.list)
    images = args.images or str(Path(cfg.data.root) / cfg.data.images_dir)
    if args.report and not Path(images).is_dir():  # fail before any output is written
        raise WeakclipError(f"{images}: image folder for --report not found (give --images)")
    result = evaluate_dirs(args.pred, args.gt, cfg.data.class_names, ids=ids, ignore_index=cfg.data.ignore_index)
    print(result.markdown())
    card = protocol_card(cfg, args.config, args.overrides, pred_dir=args.pred, list_path=args.list,
                         command=args.argv)
    if args.json:
        write_text_atomic(args.json, json.dumps(result.to_json_dict(card), indent=1) + "\n")
    if args.plot:
        for path in save_plots(result, cfg.data.class_names, args.plot):
            print(f"plot: {path}")
    if args.report:
        summary = build_report(images, args.pred, args.report, cfg.data.class_names, gt_dir=args.gt, ids=ids,
                               ignore_index=cfg.data.ignore_index, card=card)
        print(f"report: {summary['index']}")


def cmd_report(args) -> None:
    from .report import build_report, protocol_card

    cfg = _config(args)
    card = protocol_card(cfg, args.config, args.overrides, pred_dir=args.pred, list_path=args.list,
                         command=args.argv)
    summary = build_report(args.images, args.pred, args.output, cfg.data.class_names, seeds_dir=args.seeds,
                           gt_dir=args.gt, cams_dir=args.cams, ids=_read_ids(args.list),
                           ignore_index=cfg.data.ignore_index, card=card)
    problems = ", ".join(f"{n} {kind}" for kind, n in summary["problems"].items()) or "none"
    print(f"report: {summary['index']} ({summary['images']} images; problems: {problems})")


def cmd_visualize(args) -> None:
    from .visualize import visualize_dirs

    paths = visualize_dirs(args.images, args.masks, args.output, ids=_read_ids(args.list), num=args.num,
                           seed=args.seed,
                           titles=args.titles)
    print(f"{len(paths)} grids in {args.output}")


def cmd_prepare_coco(args) -> None:
    from .data.coco import prepare_coco

    summary = prepare_coco(args.instances, args.images, args.output, args.split)
    print(json.dumps(summary, indent=1, default=str))


def cmd_prepare_voc(args) -> None:
    from .data.voc import prepare_voc

    summary = prepare_voc(args.root, args.gt_dir, args.output)
    print(json.dumps(summary, indent=1))


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(args.output, data=args.data, clip=args.clip, iters=args.iters, num_images=args.num_images,
             clip_model=args.clip_model, seeds=args.seeds)


def cmd_convert_checkpoint(args) -> None:
    from .checkpoints import convert_checkpoint
    from .config import load_config

    summary = convert_checkpoint(args.input, args.output, load_config(args.config, args.overrides),
                                 vision_heads=args.vision_heads, text_heads=args.text_heads,
                                 coattn_heads=args.coattn_heads)
    print(json.dumps(summary, indent=1))


def cmd_retrain(args) -> None:
    from .retrain import retrain

    final = retrain(_config(args), args.masks, args.output, resume=args.resume)
    print(f"weights: {final}")


def cmd_predict(args) -> None:
    from .retrain import predict

    summary = predict(_config(args), args.checkpoint, args.split, args.output, fmt=args.format, shard=_shard(args),
                      reset=args.reset)
    if summary is not None:
        print(_done_line("predictions", summary))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="weakclip", description="WeakCLIP: refine CAM seeds with frozen CLIP")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("configs", help="list the shipped configs")
    p.set_defaults(func=cmd_configs)

    p = sub.add_parser("info", help="parameter counts of a config's model, as JSON (architecture only, no weights)")
    _add_config(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("parts", help="list the registered backbones and co-attention types")
    p.set_defaults(func=cmd_parts)

    p = sub.add_parser("train", help="train the WeakCLIP refiner on images + seeds (torchrun for DDP)")
    _add_config(p)
    p.add_argument("--output", required=True, help="run folder (checkpoints, logs, resolved config)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    _add_reset(p, "the seeds in OUTPUT/seeds (data.seeds_from=clip-es)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("pseudo-masks", help="multi-scale + flip + CRF pseudo masks with the Eq. 14 label filter")
    _add_config(p)
    p.add_argument("--checkpoint", required=True,
                   help="weights written by `weakclip train` or `convert-checkpoint`, or a released .pth")
    p.add_argument("--output", required=True)
    p.add_argument("--split", help="list name (default: data.split)")
    p.add_argument("--save-probs", action="store_true",
                   help="also keep the CRF's input: background + the image's classes, float16, compressed")
    _add_shard(p)
    p.set_defaults(func=cmd_pseudo_masks)

    p = sub.add_parser("seeds", help="CLIP-ES seeds from image-level labels alone (frozen CLIP, no training)")
    _add_config(p)
    p.add_argument("--output", required=True, help="folder of seed PNGs, usable as data.seeds_dir")
    p.add_argument("--split", help="list name (default: data.split)")
    p.add_argument("--save-cams", action="store_true",
                   help="also keep the float16 CAMs of each image's classes in OUTPUT/cams/<id>.npz")
    _add_shard(p)
    p.set_defaults(func=cmd_seeds)

    p = sub.add_parser("evaluate", help="mIoU, per-class table, confusion matrix of label maps against ground truth")
    p.add_argument("--pred", required=True)
    p.add_argument("--gt", required=True)
    _add_config(p)
    p.add_argument("--list", help="file of ids to score (default: every prediction)")
    p.add_argument("--json", help="write the scores as JSON here")
    p.add_argument("--plot", help="write a confusion-matrix plot and a per-class bar chart into this folder")
    p.add_argument("--report", metavar="DIR", help="also write the HTML report of --pred and --gt into this folder")
    p.add_argument("--images", help="images for --report (default: the config's data.root/data.images_dir)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("report", help="self-contained HTML report: images, seeds, CAMs, pseudo masks, ground truth")
    p.add_argument("--images", required=True, help="folder of <id>.jpg (or .png) images")
    p.add_argument("--pred", required=True, help="folder of label PNGs to inspect (pseudo masks, predictions)")
    p.add_argument("--seeds", help="folder of seed PNGs")
    p.add_argument("--gt", help="folder of ground-truth PNGs")
    p.add_argument("--cams", help="folder of <id>.npz CAMs (`weakclip seeds --save-cams` writes OUTPUT/cams)")
    p.add_argument("--list", help="file of ids, one row each (default: every PNG in --pred)")
    _add_config(p)
    p.add_argument("--output", required=True, help="report folder (index.html, images, overlays): new, empty or an earlier report, which is "
                        "replaced whole")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("visualize", help="side-by-side grids: image and label maps")
    p.add_argument("--images", required=True)
    p.add_argument("--masks", required=True, nargs="+", help="one or more folders of label PNGs")
    p.add_argument("--titles", nargs="+", help="one title per mask folder")
    p.add_argument("--output", required=True)
    p.add_argument("--list", help="file of ids (default: a random sample)")
    p.add_argument("--num", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_visualize)

    p = sub.add_parser("prepare-coco", help="COCO instances JSON -> class-index PNGs, labels and a list")
    p.add_argument("--instances", required=True, help="instances_train2014.json or instances_val2014.json")
    p.add_argument("--images", help="the COCO image folder (linked into the output)")
    p.add_argument("--output", required=True)
    p.add_argument("--split", required=True, help="list name to write, e.g. train or val")
    p.set_defaults(func=cmd_prepare_coco)

    p = sub.add_parser("prepare-voc", help="VOC 2012 image-level labels (cls_labels.json) from the ground truth")
    p.add_argument("--root", required=True, help="the VOC2012 folder (holding SegmentationClassAug or SegmentationClass)")
    p.add_argument("--gt-dir", help="ground-truth folder under --root (default: SegmentationClassAug, else SegmentationClass)")
    p.add_argument("--output", help="labels file to write (default: <root>/cls_labels.json)")
    p.set_defaults(func=cmd_prepare_voc)

    p = sub.add_parser("demo", help="the whole pipeline on synthetic data (or --data), no downloads")
    p.add_argument("--output", default="weakclip-demo")
    p.add_argument("--data", help="a folder laid out like voc-sample (default: generate synthetic data)")
    p.add_argument("--clip", help="pretrained CLIP tag or weights file (default: a small random CLIP)")
    p.add_argument("--clip-model", default="ViT-B-16", help="the open_clip model --clip belongs to")
    p.add_argument("--iters", type=int, help="training iterations (default: the config's)")
    p.add_argument("--num-images", type=int, default=48, help="synthetic images to generate")
    p.add_argument("--seeds", choices=["files", "clip-es"], default="files",
                   help="files: the data's Seeds folder; clip-es: make seeds from the image-level labels first")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("convert-checkpoint",
                       help="the authors' released .pth (mmcv) -> a weakclip checkpoint that runs in released mode")
    p.add_argument("input", help="released checkpoint, e.g. train_74p03_iter_8000.pth")
    p.add_argument("output", help="weakclip checkpoint to write (.safetensors)")
    p.add_argument("--config", default="voc", help="config whose data/inference settings go with it (default: voc)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    for part, default in (("vision", 12), ("text", 8), ("coattn", 4)):
        p.add_argument(f"--{part}-heads", type=int, help=f"attention heads of the {part} layers (released: {default})")
    p.set_defaults(func=cmd_convert_checkpoint)

    p = sub.add_parser("retrain", help="train a fully supervised segmenter on pseudo masks")
    _add_config(p)
    p.add_argument("--masks", required=True, help="pseudo-mask folder from `weakclip pseudo-masks`")
    p.add_argument("--output", required=True)
    p.add_argument("--resume", action="store_true")
    p.set_defaults(func=cmd_retrain)

    p = sub.add_parser("predict", help="multi-scale + flip + CRF predictions of a retrained segmenter or a refiner")
    _add_config(p)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--format", choices=["png", "voc-test"], default="png",
                   help="voc-test: the VOC evaluation-server layout results/VOC2012/Segmentation/comp6_test_cls")
    _add_shard(p)
    p.set_defaults(func=cmd_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # the protocol card's command
    try:
        args.func(args)
    except WeakclipError as exc:
        print(f"weakclip: error: {exc}", file=sys.stderr)
        return 130 if str(exc).startswith("interrupted") else 2
    except KeyboardInterrupt:
        print("weakclip: interrupted; rerun the same command to continue where it stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
