"""Model rewards on tiny random weights: each scores a batch exactly as an independent implementation of
its published preprocessing and formula does; the real-weight loading paths load saved tiny weights
and fail clearly when weights are absent; differentiable modes pass gradients to the pixels."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from torch import nn
from torchvision.transforms import InterpolationMode

from diffrl.rewards import build_reward
from diffrl.rewards.imaging import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, to_pil

PROMPTS = ["a photo of a red cat", 'a sign that says "open late"', "two blue squares"]
MODEL_REWARDS = ["pickscore", "clipscore", "aesthetic", "hpsv2", "hpsv2.1", "imagereward", "ocr", "vlm_judge"]
DIFFERENTIABLE = ["pickscore", "clipscore", "aesthetic", "hpsv2"]  # (and imagereward)

# OpenAI CLIP's published preprocessing (CLIP's _transform), written with torchvision on PIL images
CLIP_TRANSFORM = T.Compose([T.Resize(224, interpolation=InterpolationMode.BICUBIC), T.CenterCrop(224),
                            T.ToTensor(), T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)])


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    low = torch.rand(3, 3, 8, 6, generator=g)  # smooth, different images of 64 x 48 (crop offset 37 exact)
    x = F.interpolate(low, size=(64, 48), mode="bilinear", align_corners=False)
    return (x * 255).round() / 255


def _clip_pixels(x):
    return torch.stack([CLIP_TRANSFORM(im) for im in to_pil(x)])  # [B, 3, 224, 224]


def _clip_embeds(reward, x, prompts):
    """Unit image and text embeddings computed by hand from the reward's CLIPModel."""
    clip = reward.clip
    vision = clip.vision_model(pixel_values=_clip_pixels(x)).pooler_output  # [B, Dv]
    img = F.normalize(clip.visual_projection(vision), dim=-1)
    tok = reward.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    text = clip.text_model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).pooler_output
    return img, F.normalize(clip.text_projection(text), dim=-1)


# ---- CLIP family ----------------------------------------------------------------------------------
@torch.no_grad()
def test_pickscore_tiny_matches_published_formula(images):
    r = build_reward("pickscore", model="tiny")
    scores = r(images, PROMPTS)
    img, txt = _clip_embeds(r, images, PROMPTS)
    expected = r.clip.logit_scale.exp() * (img * txt).sum(-1)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert scores.dtype == torch.float32 and scores.shape == (3,)
    assert scores.std() > 1e-3  # the tiny model tells the images apart


@torch.no_grad()
def test_clipscore_tiny_matches_hessel_formula(images):
    r = build_reward("clipscore", model="tiny", weight=2.5).load()
    img, txt = _clip_embeds(r, images, PROMPTS)
    expected = 2.5 * (img * txt).sum(-1).clamp(min=0)
    torch.testing.assert_close(r(images, PROMPTS), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(build_reward("clipscore", model="tiny", weight=100)(images, PROMPTS),
                               expected * 40, atol=1e-3, rtol=1e-5)


@torch.no_grad()
def test_aesthetic_tiny_matches_published_mlp(images):
    r = build_reward("aesthetic", model="tiny").load()
    img, _ = _clip_embeds(r, images, PROMPTS)
    h = img
    for layer in r.head.layers:  # Linear, Dropout (identity at eval), ..., Linear: no activations
        h = layer(h)
    torch.testing.assert_close(r(images, PROMPTS), h.squeeze(-1), atol=1e-5, rtol=1e-5)
    assert [type(m).__name__ for m in r.head.layers] == ["Linear", "Dropout"] * 3 + ["Linear"] * 2
    assert set(r.head.state_dict()) == {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}


def test_clip_rewards_load_a_saved_folder_like_real_weights(images, tmp_path):
    """The real-weight path (from_pretrained on a folder) on tiny weights gives the tiny scores."""
    tiny = build_reward("pickscore", model="tiny").load()
    tiny.clip.save_pretrained(tmp_path / "model")
    tiny.image_processor.save_pretrained(tmp_path / "model")
    tiny.tokenizer.save_pretrained(tmp_path / "model")
    loaded = build_reward("pickscore", model=str(tmp_path / "model"), processor=str(tmp_path / "model"))
    torch.testing.assert_close(loaded(images, PROMPTS), tiny(images, PROMPTS), atol=1e-6, rtol=0)
    # aesthetic: CLIP folder + a head file (.pth, the published format)
    aes = build_reward("aesthetic", model="tiny").load()
    torch.save(aes.head.state_dict(), tmp_path / "head.pth")
    loaded = build_reward("aesthetic", model=str(tmp_path / "model"), head=str(tmp_path / "head.pth"))
    loaded.load()
    torch.testing.assert_close(loaded.head.layers[0].weight, aes.head.layers[0].weight)


# ---- HPSv2 (open_clip) ----------------------------------------------------------------------------
@torch.no_grad()
def test_hpsv2_tiny_matches_published_scorer(images, tmp_path):
    r = build_reward("hpsv2", model="tiny")
    scores = r(images, PROMPTS)
    # HPSv2's img_score: preprocess_val (ResizeMaxSize 224 + pad, CLIP mean/std), open_clip tokenizer,
    # model(image, text) with output_dict, diagonal of image_features @ text_features.T
    pixels = []
    for im in to_pil(images):
        w, h = im.size
        s = 224 / max(h, w)
        nh, nw = round(h * s), round(w * s)
        tf = T.Compose([T.Resize((nh, nw), interpolation=InterpolationMode.BICUBIC),
                        T.Pad(((224 - nw) // 2, (224 - nh) // 2, 224 - nw - (224 - nw) // 2, 224 - nh - (224 - nh) // 2)),
                        T.ToTensor(), T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)])
        pixels.append(tf(im))
    import open_clip

    out = r.clip(torch.stack(pixels), open_clip.get_tokenizer("ViT-H-14")(PROMPTS))
    expected = torch.diagonal(out["image_features"] @ out["text_features"].T)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert scores.std() > 1e-3
    # the checkpoint path: HPS files hold {"state_dict": ...}
    torch.save({"state_dict": r.clip.state_dict()}, tmp_path / "hps.pt")
    loaded = build_reward("hpsv2.1", model="tiny", checkpoint=str(tmp_path / "hps.pt"))
    torch.testing.assert_close(loaded(images, PROMPTS), scores, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="ViT-H-14"):
        build_reward("hpsv2", model="ViT-B-32")


# ---- ImageReward: conversion from the published checkpoint -----------------------------------------
class _RefAttention(nn.Module):
    """timm / BLIP ViT attention: fused qkv, heads of width C / H, softmax(q k^T / sqrt(d)) v, proj."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class _RefBlock(nn.Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = _RefAttention(dim, heads)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class _RefViT(nn.Module):
    """BLIP's VisionTransformer (pre-norm, class token, learned positions, final LayerNorm eps 1e-6)."""

    def __init__(self, dim=128, heads=2, depth=2, patch=32, image=224):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image // patch) ** 2 + 1, dim))
        self.blocks = nn.ModuleList(_RefBlock(dim, heads, 4 * dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # [B, N, D]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class _RefBertAttention(nn.Module):
    """med.py BertAttention: self.{query,key,value} (key/value from `width`), output.{dense,LayerNorm}."""

    def __init__(self, hidden, heads, width):
        super().__init__()
        self.heads = heads
        self.self = nn.Module()
        self.self.query, self.self.key, self.self.value = nn.Linear(hidden, hidden), nn.Linear(width, hidden), nn.Linear(width, hidden)
        self.output = nn.Module()
        self.output.dense, self.output.LayerNorm = nn.Linear(hidden, hidden), nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, x, context, mask):
        b, n, c = x.shape
        split = lambda t: t.view(b, t.shape[1], self.heads, c // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.self.query(x)), split(self.self.key(context)), split(self.self.value(context))
        scores = q @ k.transpose(-1, -2) / math.sqrt(c // self.heads) + (1.0 - mask[:, None, None, :]) * -10000.0
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.output.LayerNorm(self.output.dense(ctx) + x)


class _RefBert(nn.Module):
    """med.py BertModel(add_pooling_layer=False) in encoder mode with cross-attention to image tokens."""

    def __init__(self, vocab, hidden=32, heads=2, layers=2, inter=48, positions=40, width=128):
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(vocab, hidden)
        self.embeddings.position_embeddings = nn.Embedding(positions, hidden)
        self.embeddings.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList()
        for _ in range(layers):
            layer = nn.Module()
            layer.attention = _RefBertAttention(hidden, heads, hidden)
            layer.crossattention = _RefBertAttention(hidden, heads, width)
            layer.intermediate = nn.Module()
            layer.intermediate.dense = nn.Linear(hidden, inter)
            layer.output = nn.Module()
            layer.output.dense, layer.output.LayerNorm = nn.Linear(inter, hidden), nn.LayerNorm(hidden, eps=1e-12)
            self.encoder.layer.append(layer)

    def forward(self, ids, mask, image):
        e = self.embeddings
        x = e.LayerNorm(e.word_embeddings(ids) + e.position_embeddings(torch.arange(ids.shape[1])))
        image_mask = torch.ones(image.shape[:2])
        for layer in self.encoder.layer:
            x = layer.attention(x, x, mask.float())
            x = layer.crossattention(x, image, image_mask)
            x = layer.output.LayerNorm(layer.output.dense(F.gelu(layer.intermediate.dense(x))) + x)
        return x


@torch.no_grad()
def test_imagereward_checkpoint_conversion_matches_reference_blip(images, tmp_path):
    """A random checkpoint in ImageReward.pt's layout (BLIP's own module names), scored by an independent
    implementation of the published architecture, equals the reward loaded through the real path."""
    from transformers import BertTokenizer

    from diffrl.rewards.imagereward import REWARD_MEAN, REWARD_STD, blip_tokenizer

    letters = list("abcdefghijklmnopqrstuvwxyz")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", '"', *letters, *("##" + c for c in letters), "red", "cat"]
    folder = tmp_path / "imagereward"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = blip_tokenizer(BertTokenizer.from_pretrained(folder))
    ref = nn.Module()
    ref.blip = nn.Module()
    ref.blip.visual_encoder, ref.blip.text_encoder = _RefViT(), _RefBert(len(tok))
    ref.blip.vision_proj, ref.blip.text_proj = nn.Linear(128, 16), nn.Linear(32, 16)  # in the checkpoint, unused
    ref.mlp = nn.Module()
    ref.mlp.layers = nn.Sequential(nn.Linear(32, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                   nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))
    g = torch.Generator().manual_seed(0)
    norms = {id(m.weight) for m in ref.modules() if isinstance(m, nn.LayerNorm)}
    for p in ref.parameters():  # every parameter random, LayerNorm scales too: a misplaced one shows
        noise = torch.randn(p.shape, generator=g)
        if id(p) in norms:
            p.copy_(1.0 + 0.1 * noise)
        else:
            p.copy_(noise * (1.0 / math.sqrt(p.shape[-1]) if p.dim() > 1 else 0.1))
    ref.eval()
    state = {k: v for k, v in ref.state_dict().items()}
    torch.save(state, folder / "ImageReward.pt")
    med = {"architectures": ["BertModel"], "hidden_act": "gelu", "hidden_size": 32, "num_hidden_layers": 2,
           "num_attention_heads": 2, "intermediate_size": 48, "max_position_embeddings": 40, "layer_norm_eps": 1e-12,
           "vocab_size": len(tok), "encoder_width": 768, "add_cross_attention": True, "pad_token_id": 0}
    (folder / "med_config.json").write_text(json.dumps(med))

    # reference scoring: ImageReward.score's steps with the published transform
    pixels = torch.stack([T.Compose([T.Resize(224, interpolation=InterpolationMode.BICUBIC), T.CenterCrop(224),
                                     T.ToTensor(), T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)])(im.convert("RGB"))
                          for im in to_pil(images)])
    text = tok(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    image_embeds = ref.blip.visual_encoder(pixels)
    cls = ref.blip.text_encoder(text["input_ids"], text["attention_mask"], image_embeds)[:, 0]
    expected = (ref.mlp.layers(cls).squeeze(-1) - REWARD_MEAN) / REWARD_STD

    reward = build_reward("imagereward", model=str(folder), tokenizer=str(folder))
    scores = reward(images, PROMPTS)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)
    assert expected.std() > 1e-2  # images and prompts move the score
    assert reward.vision.config.num_attention_heads == 2 and reward.vision.config.hidden_size == 128


@torch.no_grad()
def test_imagereward_tiny_scores_follow_the_text_and_image(images):
    r = build_reward("imagereward", model="tiny")
    same_prompt = r(images, [PROMPTS[0]] * 3)
    assert same_prompt.std() > 1e-2  # the image matters through cross-attention
    tokens = r.tokenizer(PROMPTS[:1], padding="max_length", max_length=35, truncation=True)
    assert len(tokens["input_ids"][0]) == 35 and tokens["input_ids"][0][0] == r.tokenizer.cls_token_id
    assert r.tokenizer.bos_token == "[DEC]"  # ImageReward's init_tokenizer: [DEC] bos, [ENC] added
    assert r.tokenizer.convert_tokens_to_ids("[ENC]") == len(r.tokenizer) - 1 != r.tokenizer.unk_token_id


# ---- OCR ------------------------------------------------------------------------------------------
@torch.no_grad()
def test_ocr_tiny_trocr_runs_published_preprocessing_and_flow_grpo_score(images, tmp_path):
    from diffrl.rewards.ocr import ocr_score, target_text

    r = build_reward("ocr", model="tiny", max_new_tokens=6)
    texts = r.recognize(images)
    # TrOCR's processor: ViT image processor, 384 x 384 bilinear, rescale, mean = std = 0.5
    ref_tf = T.Compose([T.Resize((384, 384), interpolation=InterpolationMode.BILINEAR), T.ToTensor(),
                        T.Normalize([0.5] * 3, [0.5] * 3)])
    pixels = torch.stack([ref_tf(im) for im in to_pil(images)])
    torch.testing.assert_close(r.recognizer.pixel_values(to_pil(images)), pixels, atol=1e-6, rtol=0)
    ids = r.recognizer.model.generate(pixel_values=pixels, max_new_tokens=6, do_sample=False)
    assert texts == r.recognizer.tokenizer.batch_decode(ids, skip_special_tokens=True)
    expected = torch.tensor([ocr_score(t, target_text(p)) for t, p in zip(texts, PROMPTS)])
    torch.testing.assert_close(r(images, PROMPTS), expected)
    # the real-weight path: a TrOCR folder
    r.recognizer.model.save_pretrained(tmp_path / "trocr")
    r.recognizer.image_processor.save_pretrained(tmp_path / "trocr")
    r.recognizer.tokenizer.save_pretrained(tmp_path / "trocr")
    loaded = build_reward("ocr", model=str(tmp_path / "trocr"), max_new_tokens=6)
    assert loaded.recognize(images) == texts


def test_ocr_pluggable_recognizer_scores_with_flow_grpo_formula(images):
    scores = build_reward("ocr", recognizer="tests.test_rewards_models:fake_engine")(images, PROMPTS)
    # engine reads "OPEN LATE" everywhere: prompt 0's target is the whole prompt, 1's is "open late"
    from diffrl.rewards.ocr import levenshtein

    t0 = "aphotoofaredcat"
    expected = [1 - min(levenshtein("openlate", t0), len(t0)) / len(t0), 1.0,
                1 - min(levenshtein("openlate", "twobluesquares"), 14) / 14]
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float32))
    with pytest.raises(ValueError, match="cannot import"):
        build_reward("ocr", recognizer="tests.test_rewards_models:no_such_engine")


def fake_engine(images):
    """A recognizer plugged in by import path (stands in for an OCR engine's output)."""
    assert all(im.mode == "RGB" for im in images)
    return ["OPEN LATE"] * len(images)


# ---- VLM judge ------------------------------------------------------------------------------------
@torch.no_grad()
def test_vlm_judge_tiny_llava_runs_chat_template_generation(images, tmp_path):
    r = build_reward("vlm_judge", model="tiny", max_new_tokens=4)
    replies = r.replies(images, PROMPTS, None)
    assert len(replies) == 3 and all(isinstance(t, str) for t in replies)
    scores = r(images, PROMPTS)
    expected = torch.tensor([r.parse(t) for t in replies], dtype=torch.float32)
    assert torch.equal(torch.isnan(scores), torch.isnan(expected))  # random weights: garbage replies -> NaN
    torch.testing.assert_close(scores[~torch.isnan(scores)], expected[~torch.isnan(expected)])
    # one prompt alone gives the same reply as inside the left-padded batch
    assert r.replies(images[1:2], PROMPTS[1:2], None) == replies[1:2]
    # the real-weight path: AutoModelForImageTextToText / AutoProcessor on a saved folder. Beside a llava
    # config.json, AutoTokenizer reloads the shipped tiny CLIP tokenizer as a generic tokenizers backend,
    # which decodes its "</w>" word ends literally (CLIPTokenizer turns them into spaces): same tokens
    r.vlm.save_pretrained(tmp_path / "vlm")
    r.processor.save_pretrained(tmp_path / "vlm")
    loaded = build_reward("vlm_judge", model=str(tmp_path / "vlm"), max_new_tokens=4).replies(images, PROMPTS, None)
    words = lambda text: text.replace("</w>", " ").split()  # noqa: E731
    assert [words(t) for t in loaded] == [words(t) for t in replies]


# ---- every model reward ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_absent_real_weights_fail_clearly(name, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reward = build_reward(name)  # construction never loads: registry listings and configs stay cheap
    with pytest.raises(FileNotFoundError) as err:
        reward.load()
    msg = str(err.value)
    assert f"reward {name!r}" in msg and "Hugging Face cache" in msg and "hf download" in msg
    with pytest.raises(FileNotFoundError, match="does not exist"):
        kwargs = {"checkpoint": str(tmp_path / "missing.pt")} if name.startswith("hpsv2") else {"model": str(tmp_path / "missing")}
        build_reward(name, **kwargs).load()


@pytest.mark.parametrize("name", DIFFERENTIABLE + ["imagereward"])
def test_differentiable_mode_passes_gradients_and_matches_exact(name, images):
    exact = build_reward(name, model="tiny")(images, PROMPTS)
    r = build_reward(name, model="tiny", differentiable=True)
    assert r.differentiable
    x = images.clone().requires_grad_()
    scores = r(x, PROMPTS)
    scores.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # same model, the tensor preprocessing within ~1/255 of the exact one: scores agree closely
    torch.testing.assert_close(scores.detach(), exact, atol=0.02 * exact.abs().max().item() + 1e-3, rtol=0)


def test_model_rewards_follow_the_samples_device_and_stay_lazy(images):
    r = build_reward("clipscore", model="tiny")
    assert not r._loaded
    r.to("cpu")
    assert not r._loaded  # `to` records the device; weights load on first use
    r(images, PROMPTS)
    assert r._loaded and r.clip.device.type == "cpu"
    assert all(not p.requires_grad for p in r.clip.parameters())


# ---- where the default weights are looked for ---------------------------------------------------------
def _hf_download(cache, repo, files):
    """The layout `hf download REPO FILE...` leaves in the hub cache: models--owner--name/refs/main
    naming a commit, snapshots/<commit>/FILE (empty files here)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    for name in files:
        (root / "snapshots" / commit / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "snapshots" / commit / name).write_bytes(b"")
    return root / "snapshots" / commit


# reward -> (attribute holding a default spec, "folder" or "file", files the loader needs in that folder)
DEFAULT_WEIGHTS = {
    "pickscore": [("model", "folder", ["config.json"]), ("processor", "folder", ["preprocessor_config.json"])],
    "clipscore": [("model", "folder", ["config.json"])],
    "aesthetic": [("model", "folder", ["config.json"]), ("head_spec", "file", [])],
    "hpsv2": [("checkpoint", "file", [])],
    "hpsv2.1": [("checkpoint", "file", [])],
    "imagereward": [("model", "folder", ["ImageReward.pt", "med_config.json"]),
                    ("tokenizer_spec", "folder", ["vocab.txt"])],
    "ocr": [("model", "folder", ["config.json", "preprocessor_config.json"])],
    "vlm_judge": [("model", "folder", ["config.json"])],
}


@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_default_weights_are_found_where_hf_download_puts_them(name, tmp_path, monkeypatch):
    """Every default weight spec (README "Rewards" table) is absent from an empty cache and found once
    `hf download` has filled it; a legacy id without an owner ("bert-base-uncased") would never be."""
    from huggingface_hub import constants

    from diffrl.rewards.hub import resolve_file, resolve_folder

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    reward = build_reward(name)
    assert sorted(DEFAULT_WEIGHTS) == sorted(MODEL_REWARDS)
    for attr, kind, needs in DEFAULT_WEIGHTS[name]:
        spec = getattr(reward, attr)
        resolve = (lambda s: resolve_folder(s, reward=name, what=attr, needs=tuple(needs))) if kind == "folder" \
            else (lambda s: resolve_file(s, reward=name, what=attr, fix_arg=attr))
        with pytest.raises(FileNotFoundError, match="hf download"):
            resolve(spec)
        if kind == "folder":  # `hf download OWNER/NAME`
            expected = _hf_download(tmp_path, spec, needs)
        else:  # `hf download OWNER/NAME FILE`
            repo, filename = "/".join(spec.split("/")[:2]), "/".join(spec.split("/")[2:])
            expected = _hf_download(tmp_path, repo, [filename]) / filename
        assert resolve(spec) == expected
