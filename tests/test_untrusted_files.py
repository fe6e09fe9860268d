"""Files a user hands us are untrusted: a damaged or hand-made weights file, feature store, checkpoint
JSON or CLIP config.json is refused with a one-line error naming the file and what is wrong in it,
never read half-way, never a traceback, never a check silently switched off."""
import json
import struct

import pytest
import torch

from minivlm.model.weights import WeightsError, read_safetensors, write_safetensors


# ---------------------------------------------------------------------------------------------
# Safetensors headers, built by hand


def safetensors_file(path, header, body=b"", length=None):
    """[8-byte length][header][body]; header: a JSON-able value or raw bytes."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head) if length is None else length) + head + body)
    return path


F32_4 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}


def test_a_negative_begin_cannot_read_the_header_into_a_weight(tmp_path):
    head = json.dumps({"w": {"dtype": "U8", "shape": [512], "data_offsets": [-8, 504]}}).encode()
    p = safetensors_file(tmp_path / "m.safetensors", head, bytes(504))
    with pytest.raises(WeightsError, match=r"m\.safetensors: tensor 'w': byte range \[-8, 504\)"):
        read_safetensors(p)


def test_overlapping_tensors_are_refused(tmp_path):
    header = {"a": F32_4, "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}
    p = safetensors_file(tmp_path / "m.safetensors", header, bytes(16))
    with pytest.raises(WeightsError, match="tensors 'a' and 'b' overlap"):
        read_safetensors(p)
    # the same bytes handed out twice (an alias) are an overlap too
    p = safetensors_file(tmp_path / "m.safetensors", {"a": F32_4, "b": F32_4}, bytes(16))
    with pytest.raises(WeightsError, match="overlap"):
        read_safetensors(p)


@pytest.mark.parametrize("header, match", [
    ([], "header is a JSON list"),
    ("text", "header is a JSON str"),
    ({"w": [0, 16]}, "tensor 'w': header entry is"),
    ({"w": {"dtype": "F32", "shape": [4]}}, "tensor 'w': header entry has missing data_offsets"),
    ({"w": {**F32_4, "extra": 1}}, "tensor 'w': header entry has unknown extra"),
    ({"w": {**F32_4, "data_offsets": [0]}}, r"tensor 'w': data_offsets \[0\] is not a pair"),
    ({"w": {**F32_4, "data_offsets": [0, 16, 32]}}, "tensor 'w': data_offsets .* is not a pair"),
    ({"w": {**F32_4, "data_offsets": ["0", "16"]}}, "tensor 'w': data_offsets .* is not a pair"),
    ({"w": {**F32_4, "data_offsets": [0.0, 16.0]}}, "tensor 'w': data_offsets .* is not a pair"),
    ({"w": {**F32_4, "data_offsets": [16, 0]}}, r"tensor 'w': byte range \[16, 0\)"),
    ({"w": {**F32_4, "data_offsets": [0, 17]}}, r"tensor 'w': byte range \[0, 17\) is not inside the 16-byte"),
    ({"w": {**F32_4, "shape": [-4]}}, "tensor 'w': shape .* not a list of non-negative integers"),
    ({"w": {**F32_4, "shape": [-2, -2]}}, "tensor 'w': shape"),  # numel 4: fits the bytes, still refused
    ({"w": {**F32_4, "shape": [4.0]}}, "tensor 'w': shape"),
    ({"w": {**F32_4, "shape": [True, 4]}}, "tensor 'w': shape"),
    ({"w": {**F32_4, "shape": 4}}, "tensor 'w': shape"),
    ({"w": {**F32_4, "shape": [2**40, 2**40]}}, "tensor 'w' of shape .* does not fit its byte range"),
    ({"w": {**F32_4, "dtype": "F128"}}, "tensor 'w' has unsupported dtype 'F128'"),
    ({"w": {**F32_4, "dtype": ["F32"]}}, "tensor 'w' has unsupported dtype"),
    ({"w": F32_4, "__metadata__": {"format": 1}}, "__metadata__ must map strings to strings"),
    ({"w": F32_4, "__metadata__": ["pt"]}, "__metadata__ must map strings to strings"),
])
def test_malformed_headers_are_one_line_errors_naming_file_and_tensor(tmp_path, header, match):
    p = safetensors_file(tmp_path / "m.safetensors", header, bytes(16))
    with pytest.raises(WeightsError, match=r"m\.safetensors: .*" + match) as e:
        read_safetensors(p)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("raw, length, match", [
    (b"[" * 100_000, None, "not valid JSON"),
    (b'{"w": \xff\xfe}', None, "not valid JSON"),
    (b'{"w": 1', None, "not valid JSON"),
    (b"{}", 10**6, "runs past the end of the file"),
    (b"{}", 2**64 - 1, "runs past the end of the file"),
])
def test_unreadable_headers_are_named(tmp_path, raw, length, match):
    p = safetensors_file(tmp_path / "m.safetensors", raw, length=length)
    with pytest.raises(WeightsError, match=r"m\.safetensors: .*" + match) as e:
        read_safetensors(p)
    assert "\n" not in str(e.value)


def test_the_whole_header_is_checked_before_any_tensor_is_read(tmp_path):
    # asking for the good tensor only still refuses a file whose other entry lies
    header = {"good": F32_4, "bad": {"dtype": "F32", "shape": [4], "data_offsets": [16, 40]}}
    p = safetensors_file(tmp_path / "m.safetensors", header, bytes(32))
    with pytest.raises(WeightsError, match="tensor 'bad'"):
        read_safetensors(p, keys=["good"])


def test_well_formed_files_still_read(tmp_path):
    t = {"a": torch.randn(3, 4), "empty": torch.zeros(0, 3), "b": torch.arange(5), "c": torch.zeros(0)}
    write_safetensors(t, tmp_path / "ok.safetensors", {"format": "pt"})
    back = read_safetensors(tmp_path / "ok.safetensors")
    assert all(torch.equal(back[k], t[k]) for k in t)


# ---------------------------------------------------------------------------------------------
# The checkpoint JSON and a CLIP folder's config.json


def small_config():
    from minivlm.model.config import LMConfig, VisionConfig, VLMConfig
    return VLMConfig(lm=LMConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=512),
                     vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=32, patch_size=16))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(weights path, the JSON save_vlm wrote beside it) of a small checkpoint."""
    from minivlm.model.checkpoint import config_path_for, save_vlm
    from minivlm.model.vlm import MiniMindVLM
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "m.pth"
    save_vlm(MiniMindVLM(small_config()), path)
    return path, json.loads(open(config_path_for(path)).read())


def with_meta(saved, tmp_path, change):
    """A copy of the saved checkpoint whose JSON went through change(meta)."""
    import shutil
    path, meta = saved
    meta = json.loads(json.dumps(meta))
    change(meta)
    shutil.copy(path, tmp_path / "m.pth")
    (tmp_path / "m.json").write_text(json.dumps(meta))
    return tmp_path / "m.pth"


@pytest.mark.parametrize("change, match", [
    (lambda m: m.pop("vlm"), r'no "vlm" config'),
    (lambda m: m["vlm"]["lm"].update(num_attention_heads=0), "field lm.num_attention_heads must be an integer"),
    (lambda m: m["vlm"]["lm"].update(num_key_value_heads=3), "field lm.num_attention_heads 4 is not a multiple"),
    (lambda m: m["vlm"]["lm"].update(hidden_size=66), "field lm.hidden_size 66 is not divisible"),
    (lambda m: m["vlm"]["lm"].update(max_position_embeddings=1e12), "field lm.max_position_embeddings"),
    (lambda m: m["vlm"]["lm"].update(max_position_embeddings=10**12), "field lm.max_position_embeddings"),
    (lambda m: m["vlm"]["lm"].update(hidden_size="64"), "field lm.hidden_size must be an integer"),
    (lambda m: m["vlm"]["lm"].update(rms_norm_eps=-1), "field lm.rms_norm_eps"),
    (lambda m: m["vlm"]["lm"].update(colour="red"), "field lm .*unexpected keyword argument 'colour'"),
    (lambda m: m["vlm"].update(lm=[]), "field lm must be an object"),
    (lambda m: m["vlm"].update(projector_type="conv"), "field projector_type must be one of"),
    (lambda m: m["vlm"]["vision"].update(patch_size=0), "field vision.patch_size"),
    (lambda m: m["vlm"]["vision"].update(hidden_act="relu"), "field vision.hidden_act"),
    (lambda m: m["vlm"]["vision"].update(select_layer=7), "field vision.select_layer"),
    (lambda m: m.update(sha256="abc"), "field sha256 must map"),
    (lambda m: m["sha256"].update(weights="abc"), "field sha256.weights 'abc' is not a sha256"),
    (lambda m: m["sha256"].update(weights=None), "field sha256.weights None is not a sha256"),
    (lambda m: m.update(placeholder_id=97), "field placeholder_id"),
    (lambda m: m.update(step=-1), "field step"),
    (lambda m: m.update(tokenizer_vocab_size="many"), "field tokenizer_vocab_size"),
])
def test_a_damaged_checkpoint_json_is_named_not_a_traceback(saved, tmp_path, change, match):
    from minivlm.model.checkpoint import load_vlm
    weights = with_meta(saved, tmp_path, change)
    with pytest.raises(WeightsError, match=r"m\.json: " + match) as e:
        load_vlm(weights, vision=None)
    assert "\n" not in str(e.value)


def test_the_checkpoint_json_must_be_an_object(saved, tmp_path):
    from minivlm.model.checkpoint import load_vlm
    weights = with_meta(saved, tmp_path, lambda m: None)
    for text in ("[]", "3", "[" * 100_000):
        (tmp_path / "m.json").write_text(text)
        with pytest.raises(WeightsError, match=r"m\.json: "):
            load_vlm(weights)


def test_an_intact_checkpoint_json_still_loads(saved, tmp_path):
    from minivlm.model.checkpoint import load_vlm
    with pytest.warns(UserWarning, match="randomly initialised"):
        model = load_vlm(with_meta(saved, tmp_path, lambda m: None))
    assert model.vlm_config.lm.hidden_size == 64


def clip_folder(tmp_path, **config):
    from minivlm.model.vision import CLIPVisionModel
    folder = tmp_path / "clip"
    CLIPVisionModel(small_config().vision).save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **config}))
    return folder


@pytest.mark.parametrize("config, match", [
    ({"patch_size": 0}, "field patch_size must be an integer in"),
    ({"patch_size": 5}, "field image_size 32 is not a multiple of patch_size 5"),
    ({"hidden_act": "swish"}, "field hidden_act must be one of 'quick_gelu', 'gelu', got 'swish'"),
    ({"num_attention_heads": 3}, "field hidden_size 32 is not divisible by num_attention_heads 3"),
    ({"num_hidden_layers": -1}, "field num_hidden_layers"),
    ({"image_size": 10**9}, "field image_size"),
    ({"layer_norm_eps": "small"}, "field layer_norm_eps"),
    ({"minivlm": {"select_feature": "all"}}, "field select_feature"),
    ({"minivlm": {"colour": 1}}, "VisionConfig got an unexpected keyword argument 'colour'"),
])
def test_a_damaged_clip_config_json_is_named(tmp_path, config, match):
    from minivlm.model.vision import CLIPVisionModel
    folder = clip_folder(tmp_path, **config)
    with pytest.raises(WeightsError, match=r"clip/config\.json: " + match) as e:
        CLIPVisionModel.from_pretrained(folder)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# The feature store (python -m minivlm.features, train --features)


def make_world(shapes_dir, root):
    """A jsonl file of 8 samples with its own copy of their images, a tiny CLIP folder, and a fp32 store."""
    import shutil
    from minivlm.model.config import vlm_preset
    from minivlm.model.vision import CLIPVisionModel
    from minivlm.train.features import main as features_main
    lines = (shapes_dir / "pretrain.jsonl").read_text().splitlines()[:8]
    (root / "data" / "images").mkdir(parents=True)
    for line in lines:
        name = json.loads(line)["image"]
        shutil.copy2(shapes_dir / name, root / "data" / name)
    (root / "data" / "pretrain.jsonl").write_text("\n".join(lines) + "\n")
    torch.manual_seed(0)
    CLIPVisionModel(vlm_preset("tiny").vision).save_pretrained(root / "clip")
    assert features_main(["--data", str(root / "data" / "pretrain.jsonl"), "--vision", str(root / "clip"),
                          "--out", str(root / "feats"), "--dtype", "fp32", "--batch-size", "4",
                          "--device", "cpu"]) == 0
    return root


@pytest.fixture(scope="module")
def store_world(shapes_dir, tmp_path_factory):
    return make_world(shapes_dir, tmp_path_factory.mktemp("store_world"))


def train_with_store(world, tok, out, *extra):
    from minivlm.train.loop import main
    return main("pretrain", ["--preset", "tiny", "--data", str(world / "data" / "pretrain.jsonl"), "--tokenizer",
                             str(tok), "--out", str(out), "--batch-size", "4", "--num-workers", "0",
                             "--max-length", "128", "--max-steps", "1", "--vision", str(world / "clip"),
                             "--no-train-vision", "--dtype", "fp32", "--device", "cpu", *extra])


def copy_world(world, tmp_path):
    """A copy of the data and store (file times kept), to damage without touching the shared one."""
    import shutil
    for part in ("data", "feats"):
        shutil.copytree(world / part, tmp_path / part, copy_function=shutil.copy2)
    (tmp_path / "clip").symlink_to(world / "clip")
    return tmp_path


def test_the_store_records_every_image_it_read(store_world):
    m = json.loads((store_world / "feats" / "manifest.json").read_text())
    (d,) = m["data"]
    assert d["images_dir"] == str(store_world / "data") and len(d["images"]) == 8
    name, stamp = next(iter(d["images"].items()))
    st = (store_world / "data" / name).stat()
    assert stamp == [st.st_size, st.st_mtime_ns]


def test_training_refuses_a_store_whose_images_were_replaced(shapes_dir, shapes_tokenizer_path, tmp_path, capsys):
    from PIL import Image
    world = make_world(shapes_dir, tmp_path / "w")
    assert train_with_store(world, shapes_tokenizer_path, tmp_path / "ok", "--features", str(world / "feats")) == 0
    capsys.readouterr()
    for png in (world / "data" / "images").iterdir():  # every image black: the cached features are stale
        Image.new("RGB", Image.open(png).size).save(png)
    assert train_with_store(world, shapes_tokenizer_path, tmp_path / "r", "--features", str(world / "feats")) == 2
    out = capsys.readouterr().out
    assert "changed since the store was built; rebuild it: python -m minivlm.features --data" in out
    assert "Traceback" not in out and not (tmp_path / "r" / "log_pretrain.csv").exists()


def test_training_refuses_a_store_built_from_another_images_folder(store_world, shapes_tokenizer_path, tmp_path,
                                                                   capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert train_with_store(store_world, shapes_tokenizer_path, tmp_path / "r", "--images", str(empty),
                            "--features", str(store_world / "feats")) == 2
    assert f"built from the images in {store_world / 'data'}, this run reads {empty}" in capsys.readouterr().out


def test_a_missing_image_is_a_refusal_and_building_from_an_empty_folder_too(shapes_dir, tmp_path, capsys):
    from minivlm.train.features import FeatureStore, main as features_main
    from minivlm.common import UserError
    from minivlm.data.dataset import VLMDataset
    world = make_world(shapes_dir, tmp_path / "w")
    gone = sorted((world / "data" / "images").iterdir())[0]
    gone.unlink()
    ds = VLMDataset(world / "data" / "pretrain.jsonl", tokenizer=None)
    with pytest.raises(UserError, match=f"image {gone} is gone since the store was built"):
        FeatureStore(world / "feats").check_images([ds])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert features_main(["--data", str(world / "data" / "pretrain.jsonl"), "--images", str(empty), "--vision",
                          str(world / "clip"), "--out", str(tmp_path / "f2"), "--device", "cpu"]) == 2
    assert "could be read" in capsys.readouterr().err


def damage(folder, manifest=None, raw=None, features=None):
    if manifest is not None:
        m = json.loads((folder / "manifest.json").read_text())
        manifest(m)
        (folder / "manifest.json").write_text(json.dumps(m))
    if raw is not None:
        (folder / "manifest.json").write_bytes(raw((folder / "manifest.json").read_bytes()))
    if features is not None:
        (folder / "features.bin").write_bytes(features((folder / "features.bin").read_bytes()))


@pytest.mark.parametrize("kind, match", [
    (dict(features=lambda b: b[:-4]), r"features\.bin: \d+ bytes, the manifest promises"),
    (dict(features=lambda b: b""), r"features\.bin: 0 bytes"),
    (dict(raw=lambda b: b[: len(b) // 2]), r"manifest\.json: not valid JSON"),
    (dict(raw=lambda b: b"[1, 2]"), r"manifest\.json: not a feature store manifest"),
    (dict(manifest=lambda m: m.pop("offsets")), "field offsets is missing"),
    (dict(manifest=lambda m: m.pop("shape")), "field shape is missing"),
    (dict(manifest=lambda m: m.update(dtype="fp8")), "field dtype 'fp8' is not one of"),
    (dict(manifest=lambda m: m.update(shape=[36])), "field shape"),
    (dict(manifest=lambda m: m.update(shape=[36, -128])), "field shape"),
    (dict(manifest=lambda m: m.update(offsets=[0, 2, 1])), "field offsets"),
    (dict(manifest=lambda m: m.update(bad=[99])), "field bad"),
    (dict(manifest=lambda m: m["data"][0].pop("first_sample")), r"field data\[0\]"),
    (dict(manifest=lambda m: m.update(vision=None)), "field vision"),
    (dict(manifest=lambda m: m.update(format="minivlm-features-1")), "format 'minivlm-features-1'.*rebuild it"),
])
def test_a_damaged_store_is_named_in_one_line(store_world, tmp_path, kind, match):
    from minivlm.common import UserError
    from minivlm.train.features import FeatureStore
    world = copy_world(store_world, tmp_path / "w")
    damage(world / "feats", **kind)
    with pytest.raises(UserError, match=match) as e:
        FeatureStore(world / "feats")
    assert "\n" not in str(e.value)


def test_a_store_of_another_shape_is_refused(store_world, tmp_path):
    from minivlm.common import UserError
    from minivlm.model.config import vlm_preset
    from minivlm.train.features import FeatureStore
    world = copy_world(store_world, tmp_path / "w")
    damage(world / "feats", manifest=lambda m: m.update(shape=[72, 64]))  # same bytes, other rows
    store = FeatureStore(world / "feats")
    with pytest.raises(UserError, match=r"features of shape \(72, 64\), this tower gives \(36, 128\)"):
        store.check(world / "clip", vlm_preset("tiny").vision, [store_world / "data" / "pretrain.jsonl"])


def test_a_command_given_a_damaged_clip_folder_exits_2_in_one_line(store_world, tmp_path, capsys):
    from minivlm.train.features import main as features_main
    folder = clip_folder(tmp_path, patch_size=0)
    assert features_main(["--data", str(store_world / "data" / "pretrain.jsonl"), "--vision", str(folder),
                          "--out", str(tmp_path / "f"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "config.json: field patch_size" in err and err.count("\n") == 1
