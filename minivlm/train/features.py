"""A cache of the frozen vision tower's output: encode every image once, train many epochs on it.

    python -m minivlm.features --data train.jsonl --images imgs/ --vision clip-vit-base-patch16 --out feats/
    python train_pretrain.py ... --vision clip-vit-base-patch16 --features feats/

With the tower frozen, each epoch recomputes the same (196, 768) features of every image: 35 GFLOP per
ViT-B/16 image, more than the 26m decoder's forward and backward over the whole sample. The store holds
what the projector reads (the selected layer's patch features), so training then never decodes an image
nor runs the tower. Disk: 196 x 768 values per image, 294 KiB in fp16/bf16, 588 KiB in fp32 (fp32 gives
bit for bit the losses of an uncached run; fp16 rounds the features, by about 1e-3 relative).

A store is a folder:
    features.bin    every image's features back to back, (images, 196, 768), raw little-endian values
                    (bf16 stored as its 16 bits), read through numpy.memmap
    manifest.json   what made it (vision folder sha256, select_layer, select_feature, image_size,
                    preprocessing, dtype, the data files with size and mtime, and for a jsonl file its
                    images folder and every image it read, with size and mtime) and `offsets`: the images
                    of sample i are rows offsets[i] .. offsets[i+1]. A build writes features.bin under
                    a temporary name and switches both files only at the end, so a build that fails
                    (a full disk, Ctrl-C) leaves the old store as it was.
The vision hash is the sha256 of the folder's weights file (model.safetensors, else pytorch_model.bin).

Training refuses a store that no longer describes its inputs. Images are compared by size and mtime (in
nanoseconds), not by content: a stat per image costs ~1 s per 100K images at every start, where hashing
them would read the whole image folder again (tens of GB for MiniMind-V's data) and cost about what building
the store did. What it misses: an image replaced by one of the same size with its old mtime forced back
(`touch -d`, `cp -p` of a same-size file); rebuild by hand after such surgery.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import numpy as np
import torch

from ..model.checkpoint import sha256_of
from ..common import (DTYPES, Progress, UserError, atomic_write, is_int, one_line, positive_int,
                      resolve_device, write_error)
from ..data.dataset import DataError
from ..data.parquet import open_dataset
from ..data.processing import preprocess_image
from ..model.vision import CLIPVisionModel, clip_weights_file
from ..model.weights import WeightsError

FORMAT = "minivlm-features-2"  # 2: the images of each jsonl file are stamped (1 stamped only the jsonl)
PREPROCESSING = "clip: rgb, resize shortest side bicubic, center crop, CLIP mean/std (processing.preprocess_image)"
_NUMPY = {"fp32": np.float32, "fp16": np.float16, "bf16": np.uint16}  # bf16: numpy has none, keep the bits


def file_stamp(path) -> dict:
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime": st.st_mtime}


def image_stamp(path) -> list | None:
    """[size, mtime in ns] of an image file, None if there is none (a missing image that appears later
    changes the store's contents as much as one that is replaced)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


class StampingLoader:
    """A VLMDataset.image_loader that stamps every image it is asked for before loading it: the store
    then records exactly the files its features came from, named relative to the images folder."""

    def __init__(self, load, images_dir):
        self.load, self.images_dir, self.stamps = load, images_dir, {}

    def __call__(self, path):
        self.stamps[os.path.relpath(path, self.images_dir)] = image_stamp(path)
        return self.load(path)


def rebuild_command(m: dict, folder) -> str:
    """The `python -m minivlm.features` command that (re)builds the store `folder` for what its manifest names."""
    data = " ".join(d.get("path", "?") for d in m.get("data", []) if isinstance(d, dict))
    images = f" --images {m['images_arg']}" if m.get("images_arg") else ""
    vision = m.get("vision", {}).get("folder", "CLIP_FOLDER") if isinstance(m.get("vision"), dict) else "CLIP_FOLDER"
    return (f"python -m minivlm.features --data {data}{images} --vision {vision} --out {folder} "
            f"--dtype {m.get('dtype', 'fp16')}")


# ---------------------------------------------------------------------------------------------
# Reading a store


class FeatureStore:
    """An opened, complete store. The memmap is opened lazily in each process (DataLoader workers)."""

    def __init__(self, folder):
        self.folder = os.fspath(folder)
        path = os.path.join(self.folder, "manifest.json")
        self.manifest = read_manifest(path)
        if self.manifest.get("format") != FORMAT:
            raise UserError(f"--features {self.folder}: a store of format {self.manifest.get('format')!r}, this "
                            f"minivlm reads {FORMAT!r}; rebuild it: {rebuild_command(self.manifest, self.folder)}")
        if self.manifest.get("complete") is not True:
            raise UserError(f"--features {self.folder}: incomplete store (its run was stopped before the end); "
                            f"run python -m minivlm.features again: {rebuild_command(self.manifest, self.folder)}")
        check_manifest(self.manifest, path)
        self.offsets = np.asarray(self.manifest["offsets"], dtype=np.int64)
        self.bad = set(self.manifest["bad"])
        self.shape = tuple(self.manifest["shape"])  # (196, 768)
        check_features_file(self.folder, self.manifest)
        self._mm = None

    def __getstate__(self):
        # A spawned worker maps the file itself, and needs no image stamps (one per image of the data).
        data = [{k: v for k, v in d.items() if k != "images"} for d in self.manifest["data"]]
        return {**self.__dict__, "manifest": {**self.manifest, "data": data}, "_mm": None}

    def rows(self):
        if self._mm is None:
            m = self.manifest
            self._mm = np.memmap(os.path.join(self.folder, "features.bin"), dtype=_NUMPY[m["dtype"]], mode="r",
                                 shape=(int(self.offsets[-1]), *self.shape))
        return self._mm

    def get(self, row: int) -> torch.Tensor:
        """Image `row` as float32 (196, 768): what the projector reads."""
        t = torch.from_numpy(np.array(self.rows()[row]))
        return (t.view(torch.bfloat16) if self.manifest["dtype"] == "bf16" else t).float()

    def check(self, vision_folder, vision_config, data_paths):
        """Refuse a store made from other weights, another feature choice or other data, naming it."""
        m, v = self.manifest, self.manifest["vision"]
        if vision_folder is None:
            raise UserError(f"--features needs --vision, the CLIP folder the store was made from ({v['folder']})")
        ours = {"sha256": sha256_of(clip_weights_file(vision_folder)), "select_layer": vision_config.select_layer,
                "select_feature": vision_config.select_feature, "image_size": vision_config.image_size}
        for key, value in ours.items():
            if v[key] != value:
                raise UserError(f"--features {self.folder}: made with vision {key} {v[key]!r}, this run uses "
                                f"{value!r} ({vision_folder}); rebuild the store")
        if m["preprocessing"] != PREPROCESSING:
            raise UserError(f"--features {self.folder}: made with other preprocessing ({m['preprocessing']})")
        stamps = [file_stamp(p) for p in data_paths]
        if [s["path"] for s in stamps] != [d["path"] for d in m["data"]]:
            raise UserError(f"--features {self.folder}: made from {[d['path'] for d in m['data']]}, this run "
                            f"reads {[s['path'] for s in stamps]}; build a store for them: python -m minivlm.features")
        for old, new in zip(m["data"], stamps):
            if (old["size"], old["mtime"]) != (new["size"], new["mtime"]):
                raise UserError(f"--features {self.folder}: {new['path']} changed since the store was made "
                                f"(size/mtime {old['size']}/{old['mtime']} -> {new['size']}/{new['mtime']}); "
                                f"rebuild it: {rebuild_command(m, self.folder)}")
        want = (vision_config.num_patches + (vision_config.select_feature == "cls_patch"), vision_config.hidden_size)
        if self.shape != want:
            raise UserError(f"--features {self.folder}: features of shape {self.shape}, this tower gives {want}; "
                            f"rebuild it: {rebuild_command(m, self.folder)}")

    def check_images(self, datasets):
        """Refuse a store built from another images folder, or whose images changed since (size / mtime)."""
        for d, part in zip(self.manifest["data"], datasets):
            if "images" not in d:  # a parquet file: its images are inside it, stamped with it
                continue
            here = os.path.abspath(getattr(part, "images_dir", None) or "")
            if here != d["images_dir"]:
                raise UserError(f"--features {self.folder}: built from the images in {d['images_dir']}, this run "
                                f"reads {here} (--images); rebuild it: {rebuild_command(self.manifest, self.folder)}")
            for name, stamp in d["images"].items():
                now = image_stamp(os.path.join(here, name))
                if now != stamp:
                    what = "is gone" if now is None else "appeared" if stamp is None else "changed"
                    raise UserError(f"--features {self.folder}: image {os.path.join(here, name)} {what} since the "
                                    f"store was built; rebuild it: {rebuild_command(self.manifest, self.folder)}")

    def for_file(self, k: int) -> "FileFeatures":
        return FileFeatures(self, int(self.manifest["data"][k]["first_sample"]))


class FileFeatures:
    """The part of a store that belongs to one data file (what VLMDataset.features holds)."""

    def __init__(self, store: FeatureStore, first: int):
        self.store, self.first = store, first

    def images(self, idx: int, n: int) -> list:
        """Stand-ins for sample idx's n images: functions returning the cached features."""
        i = self.first + idx
        if i in self.store.bad:
            raise DataError("unreadable image", "its image could not be read when the feature store was made")
        lo, hi = int(self.store.offsets[i]), int(self.store.offsets[i + 1])
        if hi - lo != n:
            raise DataError("image count mismatch", f"the feature store holds {hi - lo} image(s), the sample {n}")
        return [lambda r=r: self.store.get(r) for r in range(lo, hi)]

    def empty(self) -> torch.Tensor:
        return torch.zeros(0, *self.store.shape)


def attach(store: FeatureStore, dataset):
    """Give each part of a (Concat)Dataset its slice of the store; the sample counts must agree."""
    parts = getattr(dataset, "datasets", [dataset])
    total = sum(len(d) for d in parts)
    if total != len(store.offsets) - 1:
        raise UserError(f"--features {store.folder}: {len(store.offsets) - 1} samples, the data {total}")
    for k, part in enumerate(parts):
        part.features = store.for_file(k)


def use_store(cfg, dataset, vision_config, data_paths, folder=None, dtype=None):
    """train --features (or the automatic cache's `folder`, which must hold `dtype`): refuse what a cache
    cannot serve, check the store fits the run, attach it."""
    if cfg.train_vision:
        raise UserError("--features replaces the vision tower by its cached output, so the tower cannot be "
                        "trained: drop --train-vision (or --features)")
    if not hasattr(vision_config, "select_feature"):
        raise UserError("--features: the feature cache serves CLIP towers (MiniMind-V); a SigLIP tower "
                        "(minimind-3v) runs on every step instead: drop --features")
    store = FeatureStore(folder or cfg.features)
    if dtype is not None and store.manifest["dtype"] != dtype:
        raise UserError(f"{store.folder}: a {store.manifest['dtype']} store, not {dtype}")
    store.check(cfg.vision, vision_config, data_paths)
    store.check_images(getattr(dataset, "datasets", [dataset]))
    attach(store, dataset)


# ---------------------------------------------------------------------------------------------
# Writing a store


def encode_batches(datasets, tower, image_size, batch_size, device):
    """Yield (sample index, number of images or -1 if unreadable, features (n, 196, 768) fp32) in order,
    running the tower on batches of batch_size images."""
    pending, images = [], []  # (global idx, n), preprocessed images waiting for the tower

    def flush():
        feats = (tower.select_features(torch.stack(images).to(device)).float().cpu() if images
                 else torch.zeros(0))
        k = 0
        for i, n in pending:
            yield i, n, feats[k:k + max(n, 0)]
            k += max(n, 0)
        pending.clear()
        images.clear()

    i = 0
    for ds in datasets:
        for idx in range(len(ds)):
            try:
                loaded = [preprocess_image(load(), image_size) for load in ds.record(idx)[1]]
            except DataError:  # reported again, located, when training meets the sample
                loaded = None
            pending.append((i, -1 if loaded is None else len(loaded)))
            images.extend(loaded or [])
            i += 1
            if len(images) >= batch_size:
                yield from flush()
    yield from flush()


def build_batch_size(device) -> int:
    """Images per tower forward when building. On a CPU 8 beats 32 (ViT-B/16, one thread: 12.8 vs 15.7
    CPU s for the same 32 images, measured twice): a smaller batch keeps the activations in cache."""
    return 8 if torch.device(device).type == "cpu" else 32


def build_store(data_paths, images_dir, vision_folder, out, dtype="fp16", batch_size=None, device="cpu"):
    batch_size = batch_size or build_batch_size(device)
    tower = CLIPVisionModel.from_pretrained(vision_folder).to(device).eval()
    c = tower.config
    datasets = [open_dataset(p, tokenizer=None, **({} if p.endswith(".parquet") else {"images_dir": images_dir}))
                for p in data_paths]
    n = sum(len(d) for d in datasets)
    os.makedirs(out, exist_ok=True)
    data, first = [], 0
    for p, d in zip(data_paths, datasets):
        data.append({**file_stamp(p), "first_sample": first})
        first += len(d)
        if not p.endswith(".parquet"):  # a jsonl file: its images are files of their own, stamped as read
            d.image_loader = StampingLoader(d.image_loader, os.path.abspath(d.images_dir))
    manifest = {"format": FORMAT, "complete": False, "dtype": dtype, "shape": None,
                "images_arg": os.path.abspath(images_dir) if images_dir else None,
                "vision": {"folder": os.path.abspath(vision_folder), "sha256_of": os.path.basename(
                           clip_weights_file(vision_folder)), "sha256": sha256_of(clip_weights_file(vision_folder)),
                           "select_layer": c.select_layer, "select_feature": c.select_feature,
                           "image_size": c.image_size},
                "preprocessing": PREPROCESSING, "data": data}
    offsets, bad, rows = [0], [], 0
    progress = Progress(n, "features", "samples")
    partial = os.path.join(out, f"features.bin.tmp{os.getpid()}")  # the old store stays usable until the switch
    try:
        with open(partial, "wb") as f:
            rows = write_features(f, datasets, tower, batch_size, device, dtype, manifest, offsets, bad, progress)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(partial)
        raise
    if bad and not rows:  # not one image read: the wrong --images, most likely, not a data set of broken images
        os.remove(partial)
        raise UserError(f"no image of {', '.join(data_paths)} could be read (all {len(bad)} samples with images "
                        f"failed; is --images {images_dir or '(beside the jsonl)'} the right folder?)")
    for entry, d in zip(data, datasets):
        if isinstance(getattr(d, "image_loader", None), StampingLoader):
            entry.update(images_dir=d.image_loader.images_dir, images=d.image_loader.stamps)
    manifest.update(complete=True, offsets=offsets, bad=bad, images=rows,
                    shape=manifest["shape"] or [tower.config.num_patches, c.hidden_size])
    # The switch: without a manifest a store is refused, so a kill in between never pairs a manifest with
    # the other build's features.bin.
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(out, "manifest.json"))
    os.replace(partial, os.path.join(out, "features.bin"))
    write_manifest(out, manifest)  # last: it vouches for features.bin
    return manifest


def write_features(f, datasets, tower, batch_size, device, dtype, manifest, offsets, bad, progress) -> int:
    """Encode every sample's images into the open file f; fills offsets, bad and manifest["shape"]; returns
    the number of feature rows written."""
    rows = 0
    with torch.no_grad():
        for i, count, feats in encode_batches(datasets, tower, tower.config.image_size, batch_size, device):
            if count < 0:
                bad.append(i)
            if len(feats):
                manifest["shape"] = list(feats.shape[1:])
                t = feats.to(DTYPES[dtype]).contiguous()
                f.write((t.view(torch.uint16) if dtype == "bf16" else t).numpy().tobytes())
                rows += len(feats)
            offsets.append(rows)
            progress.update(i + 1)
    return rows


def read_manifest(path) -> dict:
    """manifest.json -> dict; unreadable or not a JSON object: a UserError naming it."""
    if not os.path.isfile(path):
        raise UserError(f"--features {os.path.dirname(path)}: no manifest.json (not a feature store, or its "
                        f"`python -m minivlm.features` run never started writing)")
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except (ValueError, RecursionError) as e:  # ValueError: bad JSON or bad UTF-8
        raise UserError(f"{path}: not valid JSON ({one_line(e)}); rebuild the store with python -m minivlm.features")
    if not isinstance(m, dict):
        raise UserError(f"{path}: not a feature store manifest (a JSON {type(m).__name__})")
    return m


def check_manifest(m: dict, path):
    """Every field a complete store's reader uses has the type and range it must have: a damaged manifest
    is one line naming the field, not a KeyError or a memmap of the wrong size later in a DataLoader worker."""
    def need(ok, field, why):
        if not ok:
            raise UserError(f"{path}: field {field} {why}; rebuild the store with python -m minivlm.features")

    for key in ("dtype", "shape", "offsets", "bad", "data", "vision", "preprocessing"):
        need(key in m, key, "is missing")
    need(m["dtype"] in _NUMPY, "dtype", f"{m['dtype']!r:.40} is not one of {', '.join(_NUMPY)}")
    shape = m["shape"]
    need(isinstance(shape, list) and len(shape) == 2 and all(is_int(s) and 0 < s <= 2**16 for s in shape),
         "shape", f"{shape!r:.40} is not [features per image, width]")
    offsets = m["offsets"]
    need(isinstance(offsets, list) and offsets and all(is_int(o) for o in offsets) and offsets[0] == 0
         and all(a <= b for a, b in zip(offsets, offsets[1:])), "offsets", "is not a rising list of rows from 0")
    samples = len(offsets) - 1
    need(isinstance(m["bad"], list) and all(is_int(b) and 0 <= b < samples for b in m["bad"]), "bad",
         f"is not a list of sample indices below {samples}")
    need(isinstance(m["vision"], dict) and all(k in m["vision"] for k in ("folder", "sha256", "select_layer",
         "select_feature", "image_size")), "vision", "does not record the tower the store was made with")
    data = m["data"]
    need(isinstance(data, list) and data and all(isinstance(d, dict) for d in data), "data", "is not a list of files")
    for k, d in enumerate(data):
        need(all(key in d for key in ("path", "size", "mtime", "first_sample")) and is_int(d["first_sample"])
             and 0 <= d["first_sample"] <= samples, f"data[{k}]", "lacks path, size, mtime or first_sample")
        if "images" in d:
            need(isinstance(d.get("images_dir"), str) and isinstance(d["images"], dict), f"data[{k}].images",
                 "is not a table of image stamps with its images_dir")


def check_features_file(folder, m: dict):
    """features.bin holds exactly the rows the manifest promises (a short file would fail in a worker)."""
    path = os.path.join(folder, "features.bin")
    want = m["offsets"][-1] * m["shape"][0] * m["shape"][1] * np.dtype(_NUMPY[m["dtype"]]).itemsize
    have = os.path.getsize(path) if os.path.isfile(path) else None
    if have != want:
        raise UserError(f"{path}: {'missing' if have is None else f'{have} bytes'}, the manifest promises {want} "
                        f"({m['offsets'][-1]} images of {m['shape']} {m['dtype']}); rebuild it: "
                        f"{rebuild_command(m, folder)}")


def write_manifest(out, manifest):
    atomic_write(os.path.join(out, "manifest.json"), json.dumps(manifest).encode())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minivlm.features", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, nargs="+", metavar="FILE", help="jsonl and/or parquet files")
    p.add_argument("--images", default=None, help="image folder of the jsonl files (default: beside each)")
    p.add_argument("--vision", required=True, help="Hugging Face CLIP folder (the one training will use)")
    p.add_argument("--out", required=True, help="folder of the store")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"],
                   help="stored precision (fp32: bit-identical training; fp16/bf16: half the disk)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="images per tower forward (default: 8 on a CPU, where it is faster than 32; else 32)")
    p.add_argument("--device", default=None, help="cpu, cuda, … (default: cuda if available)")
    args = p.parse_args(argv)
    try:
        for path in args.data:
            if not os.path.isfile(path):
                raise UserError(f"--data {path}: no such file")
        m = build_store(args.data, args.images, args.vision, args.out, args.dtype, args.batch_size,
                        resolve_device(args.device))
    except (UserError, DataError, WeightsError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk while writing: the old store (if any) is left as it was
        print(f"error: {write_error(e, os.path.join(args.out, 'features.bin'))}", file=sys.stderr)
        return 2
    size = os.path.getsize(os.path.join(args.out, "features.bin"))
    print(f"wrote {args.out}: {m['images']} images of {len(m['offsets']) - 1} samples, {size / 2**20:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
