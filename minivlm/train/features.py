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
                    preprocessing, dtype, the data files with size and mtime) and `offsets`: the images
                    of sample i are rows offsets[i] .. offsets[i+1]. Written with "complete": false
                    first and "complete": true last, so a store whose run was killed is recognised.
The vision hash is the sha256 of the folder's weights file (model.safetensors, else pytorch_model.bin).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

from ..model.checkpoint import sha256_of
from ..common import DTYPES, Progress, UserError, atomic_write, one_line, positive_int, resolve_device
from ..data.dataset import DataError
from ..data.parquet import open_dataset
from ..data.processing import preprocess_image
from ..model.vision import CLIPVisionModel, clip_weights_file
from ..model.weights import WeightsError

FORMAT = "minivlm-features-1"
PREPROCESSING = "clip: rgb, resize shortest side bicubic, center crop, CLIP mean/std (processing.preprocess_image)"
_NUMPY = {"fp32": np.float32, "fp16": np.float16, "bf16": np.uint16}  # bf16: numpy has none, keep the bits


def file_stamp(path) -> dict:
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime": st.st_mtime}


# ---------------------------------------------------------------------------------------------
# Reading a store


class FeatureStore:
    """An opened, complete store. The memmap is opened lazily in each process (DataLoader workers)."""

    def __init__(self, folder):
        self.folder = os.fspath(folder)
        path = os.path.join(self.folder, "manifest.json")
        if not os.path.isfile(path):
            raise UserError(f"--features {self.folder}: no manifest.json (not a feature store, or its "
                            f"`python -m minivlm.features` run never started writing)")
        with open(path, encoding="utf-8") as f:
            self.manifest = json.load(f)
        if self.manifest.get("format") != FORMAT or not self.manifest.get("complete"):
            raise UserError(f"--features {self.folder}: incomplete store (its run was stopped before the end); "
                            f"run python -m minivlm.features again")
        self.offsets = np.asarray(self.manifest["offsets"], dtype=np.int64)
        self.bad = set(self.manifest.get("bad", []))
        self.shape = tuple(self.manifest["shape"])  # (196, 768)
        self._mm = None

    def __getstate__(self):
        return {**self.__dict__, "_mm": None}  # a spawned worker maps the file itself

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
                            f"reads {[s['path'] for s in stamps]}")
        for old, new in zip(m["data"], stamps):
            if (old["size"], old["mtime"]) != (new["size"], new["mtime"]):
                raise UserError(f"--features {self.folder}: {new['path']} changed since the store was made "
                                f"(size/mtime {old['size']}/{old['mtime']} -> {new['size']}/{new['mtime']})")

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


def use_store(cfg, dataset, vision_config, data_paths):
    """train --features: refuse what a cache cannot serve, check the store fits the run, attach it."""
    if cfg.train_vision:
        raise UserError("--features replaces the vision tower by its cached output, so the tower cannot be "
                        "trained: drop --train-vision (or --features)")
    store = FeatureStore(cfg.features)
    store.check(cfg.vision, vision_config, data_paths)
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


def build_store(data_paths, images_dir, vision_folder, out, dtype="fp16", batch_size=32, device="cpu"):
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
    manifest = {"format": FORMAT, "complete": False, "dtype": dtype, "shape": None,
                "vision": {"folder": os.path.abspath(vision_folder), "sha256_of": os.path.basename(
                           clip_weights_file(vision_folder)), "sha256": sha256_of(clip_weights_file(vision_folder)),
                           "select_layer": c.select_layer, "select_feature": c.select_feature,
                           "image_size": c.image_size},
                "preprocessing": PREPROCESSING, "data": data}
    write_manifest(out, manifest)  # "complete": false until the end
    offsets, bad, rows = [0], [], 0
    progress = Progress(n, "features", "samples")
    with open(os.path.join(out, "features.bin"), "wb") as f, torch.no_grad():
        for i, count, feats in encode_batches(datasets, tower, c.image_size, batch_size, device):
            if count < 0:
                bad.append(i)
            if len(feats):
                manifest["shape"] = list(feats.shape[1:])
                t = feats.to(DTYPES[dtype]).contiguous()
                f.write((t.view(torch.uint16) if dtype == "bf16" else t).numpy().tobytes())
                rows += len(feats)
            offsets.append(rows)
            progress.update(i + 1)
    manifest.update(complete=True, offsets=offsets, bad=bad, images=rows,
                    shape=manifest["shape"] or [tower.config.num_patches, c.hidden_size])
    write_manifest(out, manifest)  # last: it vouches for features.bin
    return manifest


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
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per tower forward")
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
    size = os.path.getsize(os.path.join(args.out, "features.bin"))
    print(f"wrote {args.out}: {m['images']} images of {len(m['offsets']) - 1} samples, {size / 2**20:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
