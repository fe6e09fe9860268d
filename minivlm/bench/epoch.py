"""`python -m minivlm.bench epoch`: one full pass over a MiniMind-V-style dataset, whole pipeline.

Where a user's time goes is an epoch: reading and decoding images, tokenizing, collating, and the
steps. This section times all of it, for two systems on the same generated data:

  minivlm    the default road (the guide's command): VLMDataset, length-grouped shuffled batches
             (--group-by-length, on by default) padded to their longest sample, the frozen tower's output
             read from the fp32 feature store that --feature-cache auto builds (building it is timed
             apart: it is paid once per run, and the "2 epochs" ratio counts it, as MiniMind-V's pretrain
             runs 2 epochs), SDPA attention, vectorised splice.
  minivlm_ungrouped the same with --no-group-by-length: plainly shuffled batches.
  minivlm_no_cache  the default road with --feature-cache off: the tower runs on every step.
  baseline   as MiniMind-V documents it: every sample padded to max_length (640 pretrain, 1536 SFT),
             no shuffling, hand-written attention, the per-sample loop splice, CLIP run in fp32 on
             every step (baselines.variant), logits at every position and the loss masked afterwards.
             Same dataset class, so image decoding costs the same.

Both train what the stage trains (pretrain: the projector; SFT: projector + decoder), share one set
of parameters and one optimizer, and run on one process; their steps are interleaved (A B A B …), so a
change in machine load hits both alike. Times are CPU seconds of this process (time.process_time:
on a shared machine other processes' work does not count) and wall seconds.

Generated data (seeded): pretrain = one image + a short question + a caption, 230-330 tokens with the
196 image tokens; SFT = one image + 1-3 question/answer turns, 300-1500 tokens (log-uniform). Images
are JPEGs of random sizes 128-512 px per side. With --quick: the tiny preset, a few samples.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from .baselines import build_model, variant
from ..common import print0
from ..data.dataset import VLMDataset, collate_vlm
from ..train.features import FeatureStore, attach, build_store
from ..train.optim import make_optimizer
from ..data.prompt import encode_chat
from ..data.tool import train_tokenizer
from ..train.optim import set_trainable
from ..train.sampler import EpochSampler

WORDS = ("the a of on in near with left right top bottom small large red green blue yellow white black "
         "square circle triangle shape picture photo image shows there is are two three several person "
         "street building tree car dog cat table window sky water road sign light dark bright old new "
         "standing sitting walking holding looking next behind front under over between").split()


def sizes(quick: bool) -> dict:
    """Per stage: samples, batch, baseline max_length, text words per sample (min, max)."""
    if quick:
        return {"pretrain": dict(n=8, batch=2, max_length=36 + 64, words=(8, 40)),
                "sft": dict(n=8, batch=2, max_length=36 + 192, words=(40, 150))}
    return {"pretrain": dict(n=32, batch=4, max_length=640, words=(20, 115)),
            "sft": dict(n=16, batch=4, max_length=1536, words=(90, 1280))}


def write_stage_data(folder, stage: str, n: int, words: tuple, seed: int = 0) -> str:
    """A MiniMind-V jsonl of n samples + their JPEGs of random sizes; returns the jsonl's path."""
    rng, rnd = np.random.default_rng(seed), random.Random(seed)
    path = os.path.join(folder, f"{stage}.jsonl")
    text = lambda k: " ".join(rnd.choice(WORDS) for _ in range(max(1, k)))
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            w, h = (int(v) for v in rng.integers(128, 513, 2))
            pixels = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)  # blocky noise, upscaled
            name = f"{stage}_{i:04d}.jpg"
            Image.fromarray(pixels).resize((w, h), Image.BILINEAR).save(os.path.join(folder, name), quality=90)
            lo, hi = words
            total = int(rnd.uniform(lo, hi)) if stage == "pretrain" else int(math.exp(rnd.uniform(math.log(lo), math.log(hi))))
            turns = 1 if stage == "pretrain" else rnd.randint(1, 3)
            conv = []
            for t in range(turns):
                q = text(max(3, total // (8 * turns)))
                conv.append({"role": "user", "content": ("<image>\n" if t == 0 else "") + q})
                conv.append({"role": "assistant", "content": text(total // turns - len(q.split()))})
            f.write(json.dumps({"conversations": conv, "image": name}) + "\n")
    return path


def collate_padded(batch, pad_id: int, max_length: int):
    """MiniMind-V's batches: every sample padded to max_length, whatever the longest one is."""
    out = collate_vlm(batch, pad_id)
    B, T = out["input_ids"].shape
    if T < max_length:
        pad = max_length - T
        out["input_ids"] = torch.cat([out["input_ids"], torch.full((B, pad), pad_id)], 1)
        out["labels"] = torch.cat([out["labels"], torch.full((B, pad), -100)], 1)
        out["attention_mask"] = torch.cat([out["attention_mask"], torch.zeros(B, pad, dtype=torch.long)], 1)
    return out


class Clock:
    """CPU and wall seconds, samples, tokens and useful (non-pad) tokens of one system."""

    def __init__(self):
        self.cpu = self.wall = 0.0
        self.samples = self.tokens = self.useful = self.steps = 0

    def report(self) -> dict:
        return {"cpu_s": self.cpu, "wall_s": self.wall, "steps": self.steps, "samples": self.samples,
                "samples_per_cpu_s": self.samples / self.cpu, "useful_tokens_per_cpu_s": self.useful / self.cpu,
                "samples_per_wall_s": self.samples / self.wall, "padding_fraction": 1 - self.useful / self.tokens}


def timed_step(model, optimizer, batches, clock: Clock, full_logits: bool = False) -> bool:
    """Fetch one batch (loading + collate) and train on it, on the clock. False when the epoch is over.
    full_logits: the output layer at every position, as MiniMind-V computes it (minivlm's loop asks for
    the loss alone, computed where labels wait)."""
    c0, w0 = time.process_time(), time.perf_counter()
    batch = next(batches, None)
    if batch is None:
        return False
    loss = model(batch["input_ids"], batch.get("pixel_values"), labels=batch["labels"],
                 image_counts=batch["image_counts"], image_features=batch.get("image_features"),
                 return_logits=full_logits).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    clock.cpu += time.process_time() - c0
    clock.wall += time.perf_counter() - w0
    clock.steps += 1
    clock.samples += batch["input_ids"].shape[0]
    clock.tokens += batch["input_ids"].numel()
    clock.useful += int(batch["attention_mask"].sum())
    return True


def bench_stage(stage, s, model, path, tok, device) -> dict:
    """One epoch of each system on one stage's data (the jsonl at `path`), interleaved step by step."""
    cfg, folder = model.vlm_config, os.path.dirname(path)
    make = lambda: VLMDataset(path, tokenizer=tok, max_length=s["max_length"], run_length=cfg.run_length,
                              image_size=cfg.vision.image_size)
    lengths = [len(encode_chat(tok, make().record(i)[0], cfg.run_length)[0]) for i in range(s["n"])]
    # minivlm: the automatic fp32 feature cache (built once, timed apart), shuffled batches, dynamic padding
    c0 = time.process_time()
    build_store([path], None, os.path.join(folder, "clip"), os.path.join(folder, f"feats_{stage}"), "fp32")
    cache_cpu = time.process_time() - c0
    cached = []
    for _ in range(2):
        cached.append(make())
        attach(FeatureStore(os.path.join(folder, f"feats_{stage}")), cached[-1])
    shuffled = EpochSampler(len(cached[1]), seed=0)
    grouped = EpochSampler(len(cached[0]), seed=0, lengths=cached[0].approx_lengths(), batch_size=s["batch"])
    dynamic = functools.partial(collate_vlm, pad_id=tok.pad_id)
    loaders = {"minivlm": DataLoader(cached[0], s["batch"], sampler=grouped, drop_last=True, collate_fn=dynamic),
               "minivlm_ungrouped": DataLoader(cached[1], s["batch"], sampler=shuffled, drop_last=True,
                                               collate_fn=dynamic),
               # the default road without the feature cache: the tower runs on every step
               "minivlm_no_cache": DataLoader(make(), s["batch"], sampler=grouped, drop_last=True,
                                              collate_fn=dynamic),
               "baseline": DataLoader(make(), s["batch"], shuffle=False, drop_last=True,
                                      collate_fn=functools.partial(collate_padded, pad_id=tok.pad_id,
                                                                   max_length=s["max_length"]))}
    set_trainable(model, stage, 0, False)
    models = {"minivlm": model, "minivlm_ungrouped": model, "minivlm_no_cache": model,
              "baseline": variant(model, attn="eager", splice="loop", vision_fp32=True)}
    optimizer = make_optimizer(model, lr=1e-5)
    clocks = {name: Clock() for name in models}
    iters = {name: iter(loader) for name, loader in loaders.items()}
    going = set(models)
    while going:
        for name in list(going):
            if not timed_step(models[name], optimizer, iters[name], clocks[name], full_logits=name == "baseline"):
                going.discard(name)
    r = {name: c.report() for name, c in clocks.items()}
    r["tokens"] = {"min": min(lengths), "median": int(np.median(lengths)), "max": max(lengths)}
    r["feature_cache_cpu_s"] = cache_cpu
    r["ratio_per_epoch"] = clocks["baseline"].cpu / clocks["minivlm"].cpu
    r["ratio_first_epoch_incl_cache"] = clocks["baseline"].cpu / (clocks["minivlm"].cpu + cache_cpu)
    r["ratio_2_epochs_incl_cache"] = 2 * clocks["baseline"].cpu / (2 * clocks["minivlm"].cpu + cache_cpu)
    r["ratio_ungrouped"] = clocks["baseline"].cpu / clocks["minivlm_ungrouped"].cpu
    r["ratio_without_cache"] = clocks["baseline"].cpu / clocks["minivlm_no_cache"].cpu
    print0(f"  {stage}: {s['n']} samples of {r['tokens']['min']}-{r['tokens']['max']} tokens (median "
           f"{r['tokens']['median']}), batch {s['batch']}, baseline max_length {s['max_length']}")
    for name in models:
        m = r[name]
        print0(f"    {name:<16} {m['cpu_s']:8.1f} CPU s ({m['wall_s']:.1f} wall) {m['samples_per_cpu_s']:7.2f} samples/CPU s "
               f"{m['useful_tokens_per_cpu_s']:8.0f} useful tok/CPU s  padding {100 * m['padding_fraction']:4.1f}%")
    print0(f"    baseline / minivlm (the default road): {r['ratio_per_epoch']:.2f}x per epoch, "
           f"{r['ratio_2_epochs_incl_cache']:.2f}x over 2 epochs incl. building the cache ({cache_cpu:.1f} CPU s, "
           f"once; {r['ratio_first_epoch_incl_cache']:.2f}x for 1 epoch); {r['ratio_ungrouped']:.2f}x with "
           f"--no-group-by-length, {r['ratio_without_cache']:.2f}x with --feature-cache off")
    return r


def bench_epoch(args, device) -> dict:
    out = {"preset": args.preset}
    print0(f"epoch: preset {args.preset}, fp32, whole pipeline (data + collate + step), minivlm vs MiniMind-V-style")
    with tempfile.TemporaryDirectory(prefix="minivlm_epoch_") as folder:
        model = build_model(args.preset, device)
        model.vision_encoder.save_pretrained(os.path.join(folder, "clip"))
        plan = sizes(args.quick)
        paths = {stage: write_stage_data(folder, stage, s["n"], s["words"], seed=1 if stage == "sft" else 0)
                 for stage, s in plan.items()}
        tok = train_tokenizer(list(paths.values()), vocab_size=6400)  # every word becomes one token
        tok.check_placeholder(model.run_length)
        model.vlm_config.placeholder_id = tok.placeholder_id
        for stage, s in plan.items():
            out[stage] = bench_stage(stage, s, model, paths[stage], tok, device)
    return out
