"""The benchmark runs end to end and reports what it documents; its baselines compute the same thing.

No timing is asserted: the numbers depend on the machine and on whatever else runs on it.
"""
import json
import mmap
import types

import pytest
import torch

from minivlm.bench import baselines, flops
from minivlm.bench import suite as bench
from minivlm.model.config import vlm_preset
from minivlm.model.vlm import MiniMindVLM


def _positive(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0


def test_quick_run_writes_the_documented_json(tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["all", "--quick", "--device", "cpu", "--json", str(out)]) == 0
    r = json.loads(out.read_text())

    assert r["meta"]["device"] == "cpu" and r["meta"]["quick"] is True and r["meta"]["preset"] == "tiny"

    d = r["data"]
    assert d["images"] > 0 and _positive(d["samples_per_s"]) and _positive(d["samples_per_s_main_process"])

    g = r["generate"]
    batches = [k for k in g if k.startswith("batch_")]
    assert batches == ["batch_1", "batch_2"]
    for k in batches:
        for field in ("prefill_ms", "decode_tokens_per_s", "e2e_tokens_per_s", "peak_mem_mb"):
            assert _positive(g[k][field]), (k, field, g[k][field])
        assert set(g[k]["ms_per_token"]) == {str(n) for n in g["new_tokens"]}
        assert all(_positive(v) for v in g[k]["ms_per_token"].values())
    mem = g["inference_memory"]
    assert _positive(mem["weights_mb"]) and _positive(mem["kv_cache_mb"])
    assert mem["peak_mb"] is None  # measured on GPU only
    roof = g["roofline"]
    assert _positive(roof["bandwidth_gb_s"]) and _positive(roof["best_ms_per_token"])
    assert roof["best_ms_per_token"] < roof["measured_ms_per_token"]  # a bound, not a measurement
    assert g["load_memory"] == {}  # skipped with --quick (it writes a 571 MB CLIP folder)

    t = r["train"]
    assert _positive(t["flops_per_step"]["total"])
    assert t["flops_per_step"]["total"] == sum(v for k, v in t["flops_per_step"].items() if k != "total")
    for name in ("minivlm", "eager_attention", "baseline"):
        for field in ("ms_per_step", "samples_per_s", "tokens_per_s", "peak_mem_mb", "tflops"):
            assert _positive(t[name][field]), (name, field, t[name][field])
        assert t[name]["mfu"] is None  # no peak FLOP/s is known for a CPU
    assert _positive(t["splice"]["vectorised_ms"]) and _positive(t["splice"]["loop_ms"])
    assert t["splice"]["match"] is True
    assert _positive(t["vision"]["fp32_ms"]) and _positive(t["vision"]["bf16_ms"])
    assert set(t["ratios"]) == {"sdpa_vs_eager", "vectorised_vs_loop_splice", "vision_bf16_vs_fp32",
                                "minivlm_vs_baseline"}
    assert all(_positive(v) for v in t["ratios"].values())
    assert torch.get_num_threads() >= 1  # main() restored the thread count it changed


def _small_vlm():
    torch.manual_seed(0)
    cfg = vlm_preset("tiny")
    cfg.vision.num_hidden_layers = 1
    return MiniMindVLM(cfg).eval()


def _spliced_inputs(model):
    """Three samples, two image slots each: two images back to back; one image (second slot is
    padding) in the middle of the text; no image at all."""
    L, pid = model.run_length, model.placeholder_id
    T = 2 * L + 10
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (3, T), generator=g)
    ids[ids == pid] = 3
    ids[0, 4:4 + 2 * L] = pid
    ids[1, 7:7 + L] = pid
    S = model.vlm_config.vision.image_size
    pixel_values = torch.randn(3, 2, 3, S, S, generator=g)
    counts = torch.tensor([2, 1, 0])
    return ids, pixel_values, counts


def test_loop_splice_equals_vectorised_splice():
    model = _small_vlm()
    ids, pixel_values, counts = _spliced_inputs(model)
    embeds = model.model.embed_tokens(ids)
    loop_model = baselines.variant(model, splice="loop")
    with torch.no_grad():
        vectorised = model.splice_images(ids, embeds, pixel_values, counts)
        assert isinstance(loop_model.splice_images, types.MethodType)
        assert loop_model.splice_images.__func__ is baselines.LoopSpliceVLM.splice_images
        loop = loop_model.splice_images(ids, embeds, pixel_values, counts)
    assert "splice_images" not in model.__dict__  # the model itself keeps the class's method

    # The splicing itself must agree bit for bit: with an encoder whose output for an image does not
    # depend on the other images of the batch, the two versions give identical tensors.
    model.encode_images = loop_model.encode_images = lambda pv: pv.flatten(1)[:, :model.run_length, None].expand(
        -1, -1, model.config.hidden_size) * 2.0
    with torch.no_grad():
        exact_vec = model.splice_images(ids, embeds, pixel_values, counts)
        exact_loop = loop_model.splice_images(ids, embeds, pixel_values, counts)
    del model.encode_images, loop_model.encode_images
    assert torch.equal(exact_vec, exact_loop)
    assert not torch.equal(exact_vec, embeds)  # something was spliced in
    # With the real tower, the loop encodes slot by slot, the vectorised version the real images in
    # one batch: the same numbers up to float rounding of differently sized matmuls.
    torch.testing.assert_close(loop, vectorised, rtol=1e-5, atol=1e-6)
    assert torch.equal(vectorised[2], embeds[2])  # the sample without images is untouched


def test_variant_switches_attention_and_leaves_the_model_alone():
    model = _small_vlm()
    base = baselines.variant(model, attn="eager", vision_fp32=True)
    assert {layer.self_attn.attn_impl for layer in base.model.layers} == {"eager"}
    assert "select_features" in type(base.vision_encoder).__dict__  # the fp32 tower's own method
    assert base.lm_head.weight is model.lm_head.weight  # the same parameters, not a copy
    assert {layer.self_attn.attn_impl for layer in model.model.layers} == {"sdpa"}
    assert "select_features" not in model.vision_encoder.__dict__


def test_flop_counts_use_the_models_own_matmul_weights():
    for preset in ("tiny", "26m", "104m"):
        cfg = vlm_preset(preset)
        with torch.device("meta"):  # shapes only, nothing allocated
            model = MiniMindVLM(cfg)
        decoder = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
        assert flops.lm_matmul_params(cfg.lm) == decoder + model.lm_head.weight.numel()
        assert flops.projector_matmul_params(cfg) == model.vision_proj.vision_proj[0].weight.numel()
        layers = model.vision_encoder.vision_model.encoder.layers
        per_layer = sum(m.weight.numel() for m in layers[0].modules() if isinstance(m, torch.nn.Linear))
        v = cfg.vision
        patch = model.vision_encoder.vision_model.embeddings.patch_embedding.weight.numel()
        tokens = v.num_patches + 1  # patches + CLS
        expected = 2 * patch * v.num_patches + len(layers) * (2 * per_layer * tokens + 4 * tokens ** 2 * v.hidden_size)
        assert flops.vision_forward_flops(v) == expected
    # MoE: a token only pays for the experts it is routed to (+ shared ones) and the router.
    moe, dense = vlm_preset("26m-moe").lm, vlm_preset("26m").lm
    ffn = 3 * dense.hidden_size * dense.intermediate_size
    extra = ffn * (moe.num_experts_per_tok + moe.n_shared_experts - 1) + moe.hidden_size * moe.n_routed_experts
    assert flops.lm_matmul_params(moe) == flops.lm_matmul_params(dense) + moe.num_hidden_layers * extra


def test_quick_epoch_section_reports_both_systems(tmp_path):
    out = tmp_path / "epoch.json"
    assert bench.main(["epoch", "--quick", "--device", "cpu", "--json", str(out)]) == 0
    r = json.loads(out.read_text())["epoch"]
    for stage in ("pretrain", "sft"):
        s = r[stage]
        for name in ("minivlm", "baseline"):
            for field in ("cpu_s", "samples_per_cpu_s", "useful_tokens_per_cpu_s"):
                assert _positive(s[name][field]), (stage, name, field)
            assert 0 <= s[name]["padding_fraction"] < 1
        # the baseline pads every sample to max_length: never less padding than dynamic padding
        assert s["baseline"]["padding_fraction"] >= s["minivlm"]["padding_fraction"]
        assert s["minivlm"]["samples"] == s["baseline"]["samples"]
        # the default road groups by length: never more padding than plainly shuffled batches
        assert s["minivlm"]["padding_fraction"] <= s["minivlm_ungrouped"]["padding_fraction"]
        assert _positive(s["ratio_per_epoch"]) and s["tokens"]["min"] <= s["tokens"]["median"] <= s["tokens"]["max"]


@pytest.mark.parametrize("kind", ["linear", "mlp2x_gelu", "ln_mlp", "identity"])
def test_projector_matmul_params_count_every_projector_weight(kind):
    from minivlm.model.projector import VisionProjector
    cfg = vlm_preset("tiny")
    cfg.projector_type = kind
    if kind == "identity":
        cfg.vision.hidden_size = cfg.lm.hidden_size
    proj = VisionProjector(kind, cfg.vision.hidden_size, cfg.lm.hidden_size)
    weights = sum(m.weight.numel() for m in proj.modules() if isinstance(m, torch.nn.Linear))
    assert flops.projector_matmul_params(cfg) == weights


def test_quick_decode_section_reports_roofline_and_token_check(tmp_path):
    out = tmp_path / "decode.json"
    assert bench.main(["decode", "--quick", "--device", "cpu", "--json", str(out)]) == 0
    r = json.loads(out.read_text())["decode"]
    rows = {(row["dtype"], row["batch"], row["way"]): row for row in r["rows"]}
    # compiled decoding is for batch 1; then eager once more on the weights it packed in huge pages
    assert set(rows) == {(d, B, way) for d in ("fp32", "bf16") for B, way in
                         [(1, "eager"), (2, "eager"), (1, "compiled"), (1, "eager, packed")]}
    assert rows[("fp32", 1, "eager, packed")]["same_tokens_as_fp32"]
    # the floor takes the faster of the two memories measured
    assert r["bandwidth_gb_s"] == max(r["bandwidth_4k_pages_gb_s"], r["bandwidth_huge_pages_gb_s"] or 0) > 0
    assert (r["bandwidth_huge_pages_gb_s"] is not None) == hasattr(mmap, "MADV_HUGEPAGE")
    for row in rows.values():
        assert row["preset"] == "tiny" and row["ms_per_step"] > 0
        assert row["pct_of_roofline"] == pytest.approx(100 * row["roofline_ms"] / row["ms_per_step"])
    assert rows[("fp32", 1, "eager")]["same_tokens_as_fp32"] and rows[("fp32", 2, "eager")]["same_tokens_as_fp32"]
    assert rows[("fp32", 1, "compiled")]["same_tokens_as_fp32"]  # the compiled step decodes the same tokens
    # bf16 weights hold half the bytes: half the floor
    assert rows[("bf16", 1, "eager")]["roofline_ms"] == pytest.approx(rows[("fp32", 1, "eager")]["roofline_ms"] / 2,
                                                                     rel=0.01)
