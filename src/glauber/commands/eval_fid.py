"""``glauber eval-fid``: FID of generated images (a folder, or a checkpoint's samples) against references, clean-fid protocol."""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

from data_modules.paths import find_path
from glauber.commands.args import add_positions_per_step, check_positions_per_step, device_of, int_at_least
from glauber.eval.fid import compute_fid, make_reference_stats
from glauber.eval.images import CheckpointImages, save_grid
from glauber.eval.inception import MODES, NVIDIA_FILE, ROUTES
from glauber.eval.inference import load_checkpoint
from glauber.files import check_output_file


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval-fid",
        help="FID of generated images against reference images or statistics (clean-fid protocol)",
        description="FID with clean-fid's 'clean' resizing and the 2015 Inception-v3. Either --generated and "
        "--reference, or --make-stats SRC --out stats.npz to save reference statistics once.",
    )
    p.add_argument("--generated", default=None, help="generated images: a folder, .zip, or .npz with 'images' uint8 [N,H,W,3]")
    p.add_argument("--checkpoint", default=None, help="or sample the generated images from this image-model checkpoint")
    p.add_argument("--num-samples", type=int_at_least(2), default=1000, help="with --checkpoint: images to sample (default 1000)")
    add_positions_per_step(p, "with --checkpoint (GGM): positions redrawn per network call")
    p.add_argument("--steps", type=int_at_least(1), default=None, help="with --checkpoint (MDLM): denoising steps")
    p.add_argument("--seed", type=int, default=0, help="with --checkpoint: sampling seed (default 0)")
    p.add_argument("--sample-batch-size", type=int_at_least(1), default=250, help="with --checkpoint: images drawn at once")
    p.add_argument(
        "--reference",
        default=None,
        help="a folder / .zip / .npz of images, hf:NAME[:split], a statistics .npz (from --make-stats), "
        "or a clean-fid name such as ffhq:256:trainval70k (downloaded once)",
    )
    p.add_argument("--make-stats", default=None, metavar="SRC", help="write the statistics of the images in SRC to --out")
    p.add_argument(
        "--route", default="auto", choices=ROUTES, help="Inception weights: clean-fid's file, the bundled copy, or auto"
    )
    p.add_argument("--mode", default="clean", choices=MODES, help="clean-fid mode (default clean)")
    p.add_argument("--inception-weights", default=None, metavar="PATH", help=f"a local copy of clean-fid's {NVIDIA_FILE}")
    p.add_argument("--image-size", type=int_at_least(1), default=None, help="centre-crop and resize images to this size first")
    p.add_argument("--batch-size", type=int_at_least(1), default=64, help="images per Inception call (default 64)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for reading and resizing (default 0)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--out", default=None, help="the JSON report (or, with --make-stats, the statistics .npz)")
    return p


def check_image_folder(ref: Any, option: str) -> None:
    """Refuse an image folder with fewer than the 2 images FID needs, before any network is loaded."""
    path = find_path(str(ref)) if isinstance(ref, (str, Path)) else None
    if path is None or not path.is_dir():
        return
    from cleanfid.utils import EXTENSIONS  # the suffixes clean-fid's get_folder_features reads

    suffixes = {f".{e.lower()}" for e in EXTENSIONS}
    images = list(itertools.islice((f for f in path.rglob("*") if f.suffix.lower() in suffixes and f.is_file()), 2))
    if len(images) == 2:
        return
    what = "is empty" if not any(path.iterdir()) else f"holds {len(images) or 'no'} image file{'' if len(images) == 1 else 's'}"
    raise ValueError(
        f"{option} {ref}: the folder {what} (FID needs at least 2 images; read: "
        f"{', '.join(sorted(suffixes))}, in subfolders too): point {option} at the images"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    for ref, option in ((args.generated, "--generated"), (args.reference, "--reference"), (args.make_stats, "--make-stats")):
        check_image_folder(ref, option)
    check_output_file(args.out, "--out")
    keys = ("route", "mode", "image_size", "batch_size", "device", "num_workers", "inception_weights")
    common = {k: getattr(args, k) for k in keys} | {"verbose": True}
    if args.make_stats:
        if not args.out:
            raise ValueError("--make-stats needs --out stats.npz")
        report = make_reference_stats(args.make_stats, args.out, **common)
        print(json.dumps(report, indent=1))
        return report
    if args.checkpoint:
        return _eval_checkpoint(args, common)
    if not args.generated or not args.reference:
        raise ValueError("eval-fid needs --generated (or --checkpoint) and --reference (or --make-stats SRC --out stats.npz)")
    report = compute_fid(args.generated, args.reference, **common)
    report["generated"] = str(args.generated)
    _emit(report, args.out)
    return report


def _emit(report: dict[str, Any], out: str | None) -> Path | None:
    """Print the JSON report, and write it to ``out`` when given (returned)."""
    print(json.dumps(report, indent=1))
    if not out:
        return None
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    return path


def _eval_checkpoint(args: argparse.Namespace, common: dict[str, Any]) -> dict[str, Any]:
    """FID of ``--num-samples`` images sampled from an image checkpoint (EMA weights, float64 draws); the
    reference defaults to the run's ``image.fid_reference`` or its training images."""
    module = load_checkpoint(args.checkpoint, device_of(args))
    if module.cfg.get("modality", "text") != "image":
        raise ValueError(f"{args.checkpoint} is a text model: eval-fid needs an image checkpoint (or --generated)")
    check_positions_per_step(args.positions_per_step, module)
    reference = args.reference or module.cfg.image.fid_reference or module.cfg.data.source
    if not args.reference:  # the run's default, checked before the minutes of sampling
        check_image_folder(reference, "--reference (default: the run's image.fid_reference or data.source)")
    imgs = CheckpointImages(module)
    given = {k: getattr(args, k) for k in ("positions_per_step", "steps") if getattr(args, k) is not None}
    options = given | {"float64": True}
    images = imgs.decode(imgs.sample_ids(args.num_samples, batch_size=args.sample_batch_size, seed=args.seed, **options))
    common = {**common, "image_size": common["image_size"] or module.cfg.data.image_size}
    report = compute_fid(images, reference, **common)
    report.update(
        checkpoint=str(args.checkpoint),
        method=module.cfg.method,
        network_calls=module.network_calls(**options),
        num_samples=args.num_samples,
        seed=args.seed,
        final_draw="float64",
        **given,
    )
    out = _emit(report, args.out)
    if out is not None:
        save_grid(images[:64], out.with_suffix(".samples.png"), ncol=8)
    return report
