"""Command-line entry points of the data module (registered as console scripts by the package).

stllm-reasim    generate a REA-Sim data set (procedural kitchens, rendered clips, REA JSON splits)
stllm-rgbd2clip convert an RGB-D sequence folder (colour + depth + trajectory.log + intrinsics) into a clip folder
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from stllm_core.errors import STLLMError


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not WIDTHxHEIGHT (e.g. 320x240)") from None
    if w < 16 or h < 16:
        raise argparse.ArgumentTypeError(f"size {text!r} is too small (at least 16x16)")
    return w, h


def reasim_main(argv: list[str] | None = None) -> int:
    """stllm-reasim --out DIR --scenes N --clips-per-scene M --frames 32 --size 320x240 --questions-per-type K
    --seed S [--workers W] [--png] [--no-depth]"""
    from stllm_core.data.reasim.generate import default_workers, generate_reasim

    ap = argparse.ArgumentParser(prog="stllm-reasim", description="Generate a REA-Sim synthetic REA-format data set.")
    ap.add_argument("--out", required=True, help="output directory (clips/, train.json, val.json, dataset.json)")
    ap.add_argument("--scenes", type=int, default=10, help="number of procedural kitchens (default 10)")
    ap.add_argument("--clips-per-scene", type=int, default=10, help="episodes per kitchen (default 10)")
    ap.add_argument("--frames", type=int, default=32, help="frames per clip, >= 8 (default 32)")
    ap.add_argument("--size", type=_size, default=(320, 240), help="frame size WIDTHxHEIGHT (default 320x240)")
    ap.add_argument("--questions-per-type", type=int, default=4, help="questions of each REA type per clip")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-fraction", type=float, default=0.2, help="share of kitchens in val.json (default 0.2)")
    ap.add_argument("--no-depth", action="store_true", help="do not write depth/ PNGs")
    ap.add_argument("--png", action="store_true", help="write lossless PNG frames instead of JPEG")
    ap.add_argument("--workers", type=int, default=default_workers(), help="processes (default: all cores)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = generate_reasim(args.out, scenes=args.scenes, clips_per_scene=args.clips_per_scene,
                                  frames=args.frames, size=args.size, questions_per_type=args.questions_per_type,
                                  seed=args.seed, val_fraction=args.val_fraction, write_depth=not args.no_depth,
                                  image_format="png" if args.png else "jpg", workers=args.workers,
                                  progress=not args.quiet)
    except STLLMError as e:
        print(f"stllm-reasim: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("out_dir", "clips", "records", "question_types", "seconds")}))
    return 0


def rgbd2clip_main(argv: list[str] | None = None) -> int:
    """stllm-rgbd2clip SRC DST [--stride K] [--max-frames N] [--fps F] [--no-depth] ..."""
    from stllm_core.data.rgbd import convert_rgbd_sequence

    ap = argparse.ArgumentParser(prog="stllm-rgbd2clip",
                                 description="Convert an RGB-D sequence (colour/ or image/, depth/, trajectory.log, "
                                             "camera intrinsic JSON) into an EPIC-style clip folder.")
    ap.add_argument("src", help="sequence folder")
    ap.add_argument("dst", help="clip folder to write")
    ap.add_argument("--trajectory", help="Redwood .log camera-to-world trajectory (default: found in SRC)")
    ap.add_argument("--intrinsic", help="Open3D PinholeCameraIntrinsic JSON (default: found in SRC)")
    ap.add_argument("--depth-scale", type=float, default=1000.0, help="depth PNG units per metre (default 1000)")
    ap.add_argument("--fps", type=float, default=30.0, help="frame rate to stamp the frames with (default 30)")
    ap.add_argument("--stride", type=int, default=1, help="keep every K-th frame")
    ap.add_argument("--max-frames", type=int, default=None, help="keep at most N frames (after --stride)")
    ap.add_argument("--no-depth", action="store_true", help="do not copy depth")
    ap.add_argument("--voxel", type=float, default=0.02, help="point-cloud voxel size in metres (default 0.02)")
    ap.add_argument("--cloud-frames", type=int, default=20, help="frames fused into the scene cloud (default 20)")
    ap.add_argument("--world", choices=("z-up", "first-camera"), default="z-up",
                    help="world frame: z-up (REP-103 map at the first camera) or the first camera's optical frame")
    ap.add_argument("--scene-id", default="", help="scene id (default: the source folder name)")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = convert_rgbd_sequence(args.src, args.dst, trajectory=args.trajectory, intrinsic=args.intrinsic,
                                    depth_scale=args.depth_scale, fps=args.fps, stride=args.stride,
                                    max_frames=args.max_frames, with_depth=not args.no_depth, voxel=args.voxel,
                                    cloud_frames=args.cloud_frames, world=args.world, scene_id=args.scene_id,
                                    overwrite=args.overwrite, progress=True)
    except STLLMError as e:
        print(f"stllm-rgbd2clip: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


def clip2bag_main(argv: list[str] | None = None) -> int:
    """stllm-clip2bag CLIP BAG [--storage mcap|sqlite3] [--depth 32FC1|16UC1|none] [--compress] [--fps F] ..."""
    from stllm_core.data.bags import DEFAULT_START_NS, BagWriterConfig, clip_to_bag

    ap = argparse.ArgumentParser(prog="stllm-clip2bag",
                                 description="Convert an EPIC-style clip folder into a rosbag2 bag: /camera/color/"
                                             "image_raw + camera_info, /camera/depth/image_raw, /tf, /tf_static, "
                                             "/scene/points (conventions: stllm_core/data/bags.py). The clip's "
                                             "qa.json is copied to BAG_qa.json.")
    ap.add_argument("clip", help="clip folder")
    ap.add_argument("bag", help="bag directory to write")
    ap.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap", help="storage plugin (default mcap)")
    ap.add_argument("--depth", choices=("32FC1", "16UC1", "none"), default="32FC1",
                    help="depth encoding: 32FC1 metres, 16UC1 millimetres, or none (default 32FC1)")
    ap.add_argument("--compress", action="store_true", help="zstd (MCAP chunks; per-message for sqlite3)")
    ap.add_argument("--fps", type=float, default=None, help="stamp frames every 1/FPS s (default: the clip's stamps)")
    ap.add_argument("--start-time", type=float, default=DEFAULT_START_NS / 1e9, metavar="SEC",
                    help="bag time of the first frame, seconds since the epoch (default %(default).0f)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing bag")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = BagWriterConfig(storage=args.storage, depth_encoding=args.depth, overwrite=args.overwrite,
                              compression="zstd" if args.compress else "none",
                              start_time_ns=int(round(args.start_time * 1e9)))
        info = clip_to_bag(args.clip, args.bag, cfg, fps=args.fps, progress=not args.quiet)
    except STLLMError as e:
        print(f"stllm-clip2bag: error: {e}", file=sys.stderr)
        return 2
    print(info)
    return 0
