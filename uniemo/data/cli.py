"""``uniemo data ...``: make the synthetic set, write shards, inspect a shard folder.

::

    uniemo data synth   --out DIR [--images N] [--size PX] [--seed S] [--world {easy,hard}] [--workers K]
    uniemo data shards  --source {emoset,folder} --root DIR --out DIR [--shard-size N] [--workers K]
                        [--on-error {skip,fail}]
    uniemo data inspect DIR
    uniemo data attributes --from-emogen DIR --out FILE
    uniemo data latents --config FILE [key=value ...] [--splits train,val] [--batch-size N] [--part K/N]

Neither writer overwrites what it did not make: ``synth`` only re-enters a folder holding a synthetic set of
the same parameters (``.uniemo-synthetic.json``), ``shards`` only a folder of its own shards from the same
source, root and shard size (re-running the same command resumes an interrupted run).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from uniemo.config.schema import EMOTIONS
from uniemo.data.records import SPLITS
from uniemo.errors import DataError
from uniemo.run_layout import ATTRIBUTES_FILE


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="synthetic set, sharding, inspection")
    dsub = p.add_subparsers(dest="data_cmd", required=True, metavar="{synth,shards,inspect,attributes,latents}")

    s = dsub.add_parser("synth", help="draw the synthetic emotion set (EmoSet layout)")
    s.add_argument(
        "--out", required=True, help="folder to write (empty, or a synthetic set of the same parameters)"
    )
    s.add_argument("--images", type=int, default=800, help="images over all splits (default 800)")
    s.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    s.add_argument("--seed", type=int, default=0, help="seed of the set (default 0)")
    s.add_argument("--world", choices=["easy", "hard"], default="easy",
                   help="generative tables: easy (colour nearly decides, default) or hard (scenes decide)")
    s.add_argument("--workers", type=int, default=1, help="processes drawing images (default 1)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=_synth)

    w = dsub.add_parser("shards", help="write WebDataset shards, manifest.json and attributes.json")
    w.add_argument(
        "--source",
        required=True,
        choices=["emoset", "folder"],
        help="emoset: EmoSet-118K layout; folder: <root>/<emotion>/*.jpg, split 80/10/10 here",
    )
    w.add_argument("--root", required=True, help="dataset folder to read")
    w.add_argument("--out", required=True, help="shard folder to write (re-running the same command resumes)")
    w.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    w.add_argument("--workers", type=int, default=1, help="processes writing shards (default 1)")
    w.add_argument(
        "--on-error",
        choices=["skip", "fail"],
        default="skip",
        help="bad records: skip and count them (default), or stop at the first",
    )
    w.add_argument(
        "--split-seed", type=int, default=0, help="folder source: seed of the train/val/test split"
    )
    w.add_argument("--no-progress", action="store_true", help="no progress bar")
    w.set_defaults(func=_shards)

    i = dsub.add_parser("inspect", help="counts per split, emotion and source; shards; skipped records")
    i.add_argument("dir", help="shard folder (or a folder of per-round shard folders)")
    i.set_defaults(func=_inspect)

    a = dsub.add_parser(
        "attributes", help="import EmoGen's attribute tables (the official alpha's base and Phi, METHOD §3.5)"
    )
    a.add_argument(
        "--from-emogen", required=True, metavar="DIR",
        help="EmoGen's dataset_balance/ folder (object_attr.pkl, scene_attr.pkl, attr_coefficient_emotion_*.pkl)",
    )
    a.add_argument("--out", required=True, help="JSON file to write (a new file); use it as data.attribute_base")
    a.set_defaults(func=_attributes)

    lat = dsub.add_parser(
        "latents", help="precompute stage 2's VAE latents (both flips) beside the shards (data.precomputed_latents)"
    )
    lat.add_argument("--config", required=True, help="the stage-2 config (data.shards, model.generator, "
                     "data.generator_image_size)")
    lat.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.shards=/data/shards")
    lat.add_argument("--splits", default="train,val", help="splits to encode (default train,val)")
    lat.add_argument("--batch-size", type=int, default=16, help="images per VAE batch (x2 for the flips)")
    lat.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                     help="storage dtype of the moments (default float16: half the disk)")
    lat.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda, cuda:1 ...")
    lat.add_argument("--part", default="0/1", help="K/N: this process takes shards K, K+N, ... (one per GPU)")
    lat.add_argument("--no-progress", action="store_true", help="no progress bar")
    lat.set_defaults(func=_latents)


# ---------------------------------------------------------------------------------------------------------
def _synth(args: argparse.Namespace) -> int:
    from uniemo.data.attributes import write_json_atomic
    from uniemo.data.synthetic import generate_synthetic_set

    out = Path(args.out)
    params = {"images": args.images, "size": args.size, "seed": args.seed}
    if args.world != "easy":  # an easy set's marker stays as it always was
        params["world"] = args.world
    if args.workers < 1:
        raise DataError(f"--workers must be >= 1, got {args.workers}")
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; give a folder")
    from uniemo.data.synthetic import SYNTH_MARKER  # numpy: not on the --help path

    marker = out / SYNTH_MARKER
    if out.is_dir() and any(out.iterdir()):
        previous = _read_json(marker)
        if previous is None:
            raise DataError(
                f"--out {out} is not empty and holds no synthetic set; give an empty or new folder"
            )
        if {k: previous.get(k) for k in (*params, "world")} != {"world": None, **params}:
            theirs = _params_text(previous)
            raise DataError(
                f"--out {out} holds a synthetic set with {theirs}; use another folder or delete it"
            )
        if previous.get("complete"):
            print(f"{out}: synthetic set with {_params_text(params)} already complete")
            return 0
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker, {**params, "complete": False})
    summary = generate_synthetic_set(out, progress=not args.no_progress, workers=args.workers, **params)
    write_json_atomic(marker, {**params, "complete": True})
    totals = ", ".join(f"{k} {v}" for k, v in summary["totals"].items())
    print(f"wrote {args.images} synthetic images of {args.size} px (seed {args.seed}, {args.world} world) to {out}: "
          f"{totals}")
    print(_world_line(args.world))
    print(f"next: uniemo data shards --source emoset --root {out} --out <shard folder>")
    return 0


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={params.get(k)}" for k in ("images", "size", "seed")) + f", world={params.get('world') or 'easy'}"


def _world_line(world: str) -> str:
    """The world's best possible accuracies, from its generative tables (:func:`decision_rates`)."""
    from uniemo.data.synthetic import decision_rates, world_of

    rates = decision_rates(world_of(world))
    return (f"synthetic world {world}: a colour-only classifier reaches at most {rates['colour_only']:.3f}, the Bayes "
            f"rate is {rates['bayes']:.3f} (scene and objects without colour: {rates['scene_and_objects']:.3f}); "
            "from the world's generative tables")


def _shards(args: argparse.Namespace) -> int:
    from uniemo.data.folders import describe_ignored
    from uniemo.data.shards import write_shards

    manifest = write_shards(
        source=args.source,
        root=args.root,
        out=args.out,
        shard_size=args.shard_size,
        workers=args.workers,
        on_error=args.on_error,
        progress=not args.no_progress,
        folder_seed=args.split_seed,
    )
    totals = ", ".join(f"{s} {t['samples']} in {t['shards']} shards" for s, t in manifest["totals"].items())
    print(f"{args.out}: {totals}; skipped {manifest['skipped']['total']}")
    ignored = describe_ignored(manifest.get("ignored", {}))
    if ignored:
        print(f"{args.root}: {ignored}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from uniemo.data.shards import manifest_folders, read_manifest

    root = Path(args.dir)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; give a shard folder written by `uniemo data shards`")
    folders = manifest_folders(root)
    if not folders:
        read_manifest(root)  # raises the DataError naming the missing manifest
    for n, folder in enumerate(folders):
        if n:
            print()
        sys.stdout.write(format_inspection(folder, read_manifest(folder)))
    return 0


def _attributes(args: argparse.Namespace) -> int:
    from uniemo.data.attributes import import_emogen, write_json_atomic

    out = Path(args.out)
    if out.exists():
        raise DataError(f"--out {out} exists; give a new file name or delete it")
    if not out.parent.is_dir():
        raise DataError(f"--out {out}: folder {out.parent} does not exist; create it first")
    base = import_emogen(args.from_emogen)
    write_json_atomic(out, base)
    kinds = [b["kind"] for b in base["base"]]
    distinct = len({b["name"] for b in base["base"]})
    print(
        f"wrote {out}: attribute base of {len(kinds)} names ({kinds.count('object')} object, {kinds.count('scene')} "
        f"scene; {distinct} distinct), Phi over {len(base['phi_table'])} names"
    )
    if base["without_phi"]:
        print(f"  without Phi (alpha 0, as the official code): {', '.join(base['without_phi'])}")
    print(f"next: uniemo train --config <stage-2 config> data.attributes=emogen data.attribute_base={out}")
    return 0


def _latents(args: argparse.Namespace) -> int:
    import torch

    from uniemo.config import load_config
    from uniemo.data.latents import parse_part, write_latents
    from uniemo.data.records import SPLITS
    from uniemo.data.source import data_source
    from uniemo.models.generator import build_generator

    cfg = load_config(args.config, args.overrides)
    splits = [s for s in args.splits.split(",") if s]
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise DataError(f"--splits {args.splits!r}: choose from {', '.join(SPLITS)}")
    if args.batch_size < 1:
        raise DataError(f"--batch-size must be >= 1, got {args.batch_size}")
    part = parse_part(args.part)
    from uniemo.data.remote import is_url

    if cfg.data.shards and is_url(cfg.data.shards):
        raise DataError(f"data.shards={cfg.data.shards!r} is a URL; precomputed latents are read from a local "
                        "shard folder: copy the shards (or mount them) and give that folder")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    folder = data_source(cfg.data, progress=not args.no_progress)
    size = cfg.data.generator_image_size
    generator = build_generator(cfg.model.generator, image_size=size, seed=cfg.run.seed).to(device).eval()
    manifest = write_latents(folder, generator, size, resample=cfg.data.generator_resample, splits=splits,
                             batch_size=args.batch_size, dtype=args.dtype, part=part, progress=not args.no_progress)
    samples = sum(e["samples"] for e in manifest["shards"])
    print(f"{folder}/latents-{size}: {len(manifest['shards'])} shards, {samples} images x 2 flips "
          f"({manifest['dtype']})")
    print("next: uniemo train --config <stage-2 config> data.precomputed_latents=true")
    return 0


def format_inspection(folder: Path, manifest: dict[str, Any]) -> str:
    """A readable report of one shard folder: origin, counts per split x emotion, sources, skips, shards."""
    from uniemo.data.attributes import AttributeTable

    lines = [f"shard folder {folder}"]
    if "reader" in manifest:
        lines.append(
            f"  written from {manifest['reader']} {manifest.get('root')} (shard size {manifest.get('shard_size')})"
        )
    from uniemo.data.shards import synthetic_world

    world = synthetic_world(manifest)
    if world:
        lines.append(f"  {_world_line(world)}")
    if manifest.get("labelled_per_emotion"):
        lines.append(
            f"  label-scarce subset of {manifest.get('subset_of')}: {manifest['labelled_per_emotion']} labelled train "
            "images per emotion, val and test whole"
        )

    header = ["split", "shards", "samples", *EMOTIONS]
    rows = []
    total = [0, 0] + [0] * len(EMOTIONS)
    for split, t in manifest.get("totals", {}).items():
        counts = t.get("emotion_counts", [0] * len(EMOTIONS))
        rows.append([split, t["shards"], t["samples"], *counts])
        total = [a + b for a, b in zip(total, [t["shards"], t["samples"], *counts], strict=True)]
    rows.append(["total", *total])
    lines += ["", *_table(header, rows)]

    by_source: dict[tuple[str, str], int] = {}
    for e in manifest["shards"]:
        key = (e.get("source", ""), e["split"])
        by_source[key] = by_source.get(key, 0) + e["samples"]
    order = {name: i for i, name in enumerate(SPLITS)}
    source_rows = [
        [s, sp, n]
        for (s, sp), n in sorted(by_source.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 9)))
    ]
    lines += ["", *_table(["source", "split", "samples"], source_rows)]

    skipped = manifest.get("skipped", {})
    lines += ["", f"skipped records: {skipped.get('total', 0)}"]
    for reason, count in sorted(skipped.get("by_reason", {}).items()):
        lines.append(f"  {reason}: {count}")
        for example in skipped.get("examples", {}).get(reason, [])[:2]:
            lines.append(f"    e.g. {example}")

    ignored = manifest.get("ignored", {})
    if ignored.get("total"):
        lines.append(f"ignored files (not images): {ignored['total']}")
        for reason, count in sorted(ignored.get("by_reason", {}).items()):
            examples = ", ".join(ignored.get("examples", {}).get(reason, [])[:3])
            lines.append(f"  {reason}: {count} (e.g. {examples})")

    if (folder / ATTRIBUTES_FILE).is_file():
        table = AttributeTable.load(folder)
        lines += [
            "",
            f"attributes: {len(table.scenes)} scenes, {len(table.objects)} objects; base of "
            f"{len(table.base_names)} seen >= {table.min_count} times (beta {table.beta})",
        ]

    shard_rows = [
        [
            e["name"],
            e["split"],
            e.get("source", ""),
            e["samples"],
            e.get("bytes", ""),
            str(e.get("sha256", ""))[:12],
        ]
        for e in manifest["shards"]
    ]
    lines += ["", *_table(["shard", "split", "source", "samples", "bytes", "sha256"], shard_rows)]
    return "\n".join(lines) + "\n"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )

    return [fmt(cells[0]), "  ".join("-" * w for w in widths), *(fmt(r) for r in cells[1:])]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
