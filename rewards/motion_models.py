"""Learned text-motion rewards on HumanML3D features, with weights the user supplies: TMR retrieval and the T2M
evaluator.

    reward = build_reward("tmr", model="/path/to/tmr")            # cosine(text, motion) of TMR's embeddings, in [-1, 1]
    reward = build_reward("t2m_evaluator", model="/path/to/t2m")  # minus the T2M evaluator's text-motion distance
    reward = build_reward("tmr", model="tiny")                    # random tiny weights: the same code, for tests
    scores = reward(features, prompts)  # de-normalised HumanML3D features [B, T, 263] -> float32 [B]

Both are differentiable with respect to the features, and every frame of a clip counts (samples carry no lengths).
Neither model is published in a form that loads directly, so each reads a diffrl folder (below; `save(folder)` writes
one, `convert_tmr` / `convert_t2m` build one from the public checkpoints). Weights are never downloaded: `model` is a
local folder or a hub repo id already in the Hugging Face cache, and a missing folder fails naming where it looked.

TMR (Petrovich et al., ICCV 2023): two ACTOR-style transformer encoders into one 256-d space. Each projects its
inputs to the latent width, prepends two learned tokens (the mean and log-variance of a Gaussian), adds sinusoidal
positions and runs a transformer encoder (6 layers, 4 heads, ff 1024, GELU); the output at the mean token is the
embedding. The motion encoder reads the 263-d features normalised by the model's statistics, (x - mean) /
(std + std_eps); the text encoder reads DistilBERT's last hidden states (768-d per token, padding masked).
    config.json            {"format": "diffrl-tmr", "latent_dim": 256, "ff_size": 1024, "num_layers": 6, ...}
    encoders.safetensors   motion_encoder.*, text_encoder.* (the two encoders), motion_mean [263], motion_std [263]
    distilbert/            a transformers DistilBERT folder with its tokenizer (config.json's text_model: this
                           subfolder's name, or a hub id in the cache such as "distilbert/distilbert-base-uncased")
Converting the public release (assumed layout, not checked against the real files here): TMR's extracted weights
are one state dict per module (motion_encoder.pt, text_encoder.pt, as written by its extract script) and its
statistics mean.pt / std.pt of the guoh3dfeats features; the encoders here keep the reference's parameter names
(projection, tokens, seqTransEncoder), so `convert_tmr` only prefixes the keys (a stored positional table is
dropped: it is recomputed) and loads them strictly, which names any key that differs.

T2M evaluator (Guo et al., CVPR 2022), the encoders behind R-precision, MM-Dist, FID and diversity: a 1-d convolution
stack (MovementConvEncoder, 259 -> 512 -> 512, time / 4) on the normalised features without the 4 foot-contact
channels, then a bidirectional GRU (MotionEncoderBiGRUCo, hidden 1024 -> 512); texts go word by word through
another bidirectional GRU (TextEncoderBiGRUCo, hidden 512 -> 512) on 300-d word vectors plus a 15-way part-of-speech
one-hot, wrapped in sos / eos, at most 20 words. The reference takes GloVe vectors and spaCy's lemmas and tags; here
a word table in the weights folder stands in for both (vocabulary.json: words, optional lemma and tag lookups).
    config.json             {"format": "diffrl-t2m-evaluator", "movement_hidden": 512, ...}
    evaluator.safetensors   movement_encoder.*, motion_encoder.*, text_encoder.*, motion_mean [263], motion_std [263],
                            word_vectors [V, 300] (row i: the vector of words[i])
    vocabulary.json         {"words": [...], "pos": {"walk": "VERB", ...}, "lemmas": {"walks": "walk", ...}}
Converting the public release (assumed layout, not checked here): its text_mot_match/model/finest.tar holds state
dicts under 'movement_encoder', 'motion_encoder' and 'text_encoder' with the parameter names kept here; the
statistics are the evaluator's mean.npy / std.npy (MDM ships them as t2m_mean.npy / t2m_std.npy); the word vectors
and words are the GloVe subset our_vab_data.npy with our_vab_words.pkl / our_vab_idx.pkl (a word's row is its index).
Words are lower-cased alphabetic tokens; a word missing from the table reads as "unk" with tag OTHER, as the
reference does; without the spaCy lemmatiser, inflected forms need a `lemmas` entry to reach their lemma's vector.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from .hub import TINY, ModelReward, dtype_kwarg, resolve_folder, seeded
from .registry import register_reward

FEATURES = 263
"""HumanML3D's feature width; both models read all of it (T2M drops the last 4, the foot contacts)."""
CONTACT_DIMS = 4
UNIT_LENGTH = 4
"""T2M's time downsampling: two stride-2 convolutions, so a clip of T frames gives T // 4 movement steps."""

CONFIG = "config.json"
TMR_WEIGHTS = "encoders.safetensors"
T2M_WEIGHTS = "evaluator.safetensors"
T2M_VOCABULARY = "vocabulary.json"

POS_TAGS = ("VERB", "NOUN", "DET", "ADP", "NUM", "AUX", "PRON", "ADJ", "ADV",
            "Loc_VIP", "Body_VIP", "Obj_VIP", "Act_VIP", "Desc_VIP", "OTHER")
"""The T2M text encoder's 15 part-of-speech classes, in one-hot order."""
VIP_WORDS = {  # words whose tag the reference replaces by a motion class (its word vectoriser's lists as recalled, not checked here)
    "Loc_VIP": ("left", "right", "clockwise", "counterclockwise", "anticlockwise", "forward", "back", "backward",
                "up", "down", "straight", "curve"),
    "Body_VIP": ("arm", "chin", "foot", "feet", "face", "hand", "mouth", "leg", "waist", "eye", "knee", "shoulder",
                 "thigh"),
    "Obj_VIP": ("stair", "dumbbell", "chair", "window", "floor", "car", "ball", "handrail", "baseball", "basketball"),
    "Act_VIP": ("walk", "run", "swing", "pick", "bring", "kick", "put", "squat", "throw", "hop", "dance", "jump",
                "turn", "stumble", "stop", "sit", "lift", "lower", "raise", "wash", "stand", "kneel", "stroll", "rub",
                "bend", "balance", "flap", "jog", "shuffle", "lean", "rotate", "spin", "spread", "climb"),
    "Desc_VIP": ("slowly", "carefully", "fast", "careful", "slow", "quickly", "happy", "angry", "sad", "happily",
                 "angrily", "sadly"),
}
VIP_TAG = {word: tag for tag, words in VIP_WORDS.items() for word in words}


# ---- configs and folders -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TmrConfig:
    """TMR's architecture; the defaults are the published model's (configs/model/tmr.yaml)."""

    motion_dim: int = FEATURES
    """Width of the motion features (HumanML3D 263)."""
    text_dim: int = 768
    """Width of the text model's token features (DistilBERT-base's hidden size)."""
    latent_dim: int = 256
    ff_size: int = 1024
    num_layers: int = 6
    num_heads: int = 4
    activation: str = "gelu"
    std_eps: float = 1e-12
    """Added to the std when normalising the features (TMR's normaliser)."""
    text_model: str = "distilbert"
    """The DistilBERT folder: a subfolder of the weights folder, or a hub id in the Hugging Face cache."""


@dataclass(frozen=True)
class T2mConfig:
    """The T2M evaluator's architecture; the defaults are the published evaluator's."""

    motion_dim: int = FEATURES
    movement_hidden: int = 512
    """Channels of the first convolution (dim_movement_enc_hidden)."""
    movement_latent: int = 512
    """Channels of the second convolution and the movement features (dim_movement_latent)."""
    motion_hidden: int = 1024
    """Motion GRU width (dim_motion_hidden)."""
    text_hidden: int = 512
    """Text GRU width (dim_text_hidden)."""
    embedding_dim: int = 512
    """Width of the shared text-motion space (dim_coemb_hidden)."""
    word_dim: int = 300
    """Width of the word vectors (GloVe 300)."""
    max_text_len: int = 20
    """Words kept per text, before sos / eos are added."""


TINY_TMR = TmrConfig(text_dim=16, latent_dim=16, ff_size=32, num_layers=1, num_heads=2)
TINY_T2M = T2mConfig(movement_hidden=16, movement_latent=16, motion_hidden=16, text_hidden=16, embedding_dim=12,
                     word_dim=8)
FORMATS = {TmrConfig: "diffrl-tmr", T2mConfig: "diffrl-t2m-evaluator"}
LAYOUTS = {
    "tmr": f"{CONFIG} + {TMR_WEIGHTS} + distilbert/",
    "t2m_evaluator": f"{CONFIG} + {T2M_WEIGHTS} + {T2M_VOCABULARY}",
}


def weights_folder(spec: str | None, *, reward: str, needs: tuple[str, ...]) -> Path:
    """The local folder of `spec` (a folder, or a hub repo id already in the Hugging Face cache) holding `needs`.
    FileNotFoundError naming what was looked for, where, and the fix."""
    fix = (f"Fix: pass model=<a folder holding {LAYOUTS[reward]}> (the docstring of diffrl.rewards.motion_models "
           f"gives the layout and how to convert the public checkpoint), or model='tiny' for random tiny weights.")
    if spec is None:
        raise FileNotFoundError(f"reward {reward!r} has no default weights: none are published in a layout it reads. "
                                f"{fix}")
    try:
        return resolve_folder(spec, reward=reward, what="weights", needs=needs)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err} {fix}") from err


def read_config(cls, path: Path):
    """A config dataclass from config.json, whose "format" must be the class's; unknown fields fail by name."""
    data = json.loads(path.read_text())
    if data.pop("format", None) != FORMATS[cls]:
        raise ValueError(f"{path} is not a {FORMATS[cls]!r} config (its \"format\" field must say so)")
    unknown = sorted(set(data) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"{path}: unknown fields {unknown}; valid fields are {[f.name for f in fields(cls)]}")
    return cls(**data)


def write_config(config, path: Path) -> None:
    path.write_text(json.dumps({"format": FORMATS[type(config)], **asdict(config)}, indent=2) + "\n")


def save_tensors(module: nn.Module, path: Path, extra: dict[str, Tensor] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {**module.state_dict(), **(extra or {})}
    save_file({key: value.detach().cpu().contiguous() for key, value in tensors.items()}, str(path))


def load_tensors(module: nn.Module, state: dict[str, Tensor], source: Path | str) -> None:
    """Strict load; a layout mismatch names the file and the keys."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{source} does not hold the weights of this architecture (config.json): {err}") from err


def check_features(samples: Tensor, reward: str, min_frames: int = 1) -> None:
    if samples.shape[-1] != FEATURES:
        raise ValueError(f"reward {reward!r} reads de-normalised HumanML3D features [B, T, {FEATURES}], got width "
                         f"{samples.shape[-1]} (samples {list(samples.shape)}); a model on another representation "
                         f"(e.g. the 67-d root + ric subset) must convert its samples to the {FEATURES}-d layout")
    if samples.shape[1] < min_frames:
        raise ValueError(f"reward {reward!r} needs at least {min_frames} frames, got {samples.shape[1]}")


# ---- TMR -------------------------------------------------------------------------------------------------------
def sinusoidal_positions(length: int, dim: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """[length, dim] transformer positions: sin on even channels, cos on odd, frequencies 10000^(-2i / dim)."""
    position = torch.arange(length, dtype=torch.float64, device=device)[:, None]  # [L, 1]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64, device=device) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, dtype=torch.float64, device=device)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)
    return table.to(dtype)  # [L, dim]


class ActorStyleEncoder(nn.Module):
    """ACTOR-style sequence encoder: learned distribution tokens (mean, log-variance) read out of a transformer over
    [tokens, projected inputs]. Parameter names follow TMR's, so its state dicts load unchanged."""

    def __init__(self, input_dim: int, config: TmrConfig, num_tokens: int = 2):
        super().__init__()
        self.projection = nn.Linear(input_dim, config.latent_dim)
        self.tokens = nn.Parameter(torch.randn(num_tokens, config.latent_dim))
        layer = nn.TransformerEncoderLayer(config.latent_dim, config.num_heads, config.ff_size, dropout=0.1,
                                           activation=config.activation, batch_first=True)
        self.seqTransEncoder = nn.TransformerEncoder(layer, config.num_layers, enable_nested_tensor=False)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x [B, L, input_dim], mask [B, L] (True: a real step) -> the token outputs [B, num_tokens, latent]."""
        batch, num_tokens = x.shape[0], self.tokens.shape[0]
        steps = self.projection(x)  # [B, L, latent]
        sequence = torch.cat([self.tokens.expand(batch, -1, -1), steps], dim=1)  # [B, K + L, latent]
        sequence = sequence + sinusoidal_positions(sequence.shape[1], sequence.shape[2], sequence.dtype, x.device)
        keep = torch.cat([mask.new_ones(batch, num_tokens), mask.bool()], dim=1)  # [B, K + L]
        out = self.seqTransEncoder(sequence, src_key_padding_mask=~keep)  # [B, K + L, latent]
        return out[:, :num_tokens]


class TmrEncoders(nn.Module):
    """TMR's motion and text encoders with the motion statistics they expect."""

    def __init__(self, config: TmrConfig):
        super().__init__()
        self.config = config
        self.motion_encoder = ActorStyleEncoder(config.motion_dim, config)
        self.text_encoder = ActorStyleEncoder(config.text_dim, config)
        self.register_buffer("motion_mean", torch.zeros(config.motion_dim))
        self.register_buffer("motion_std", torch.ones(config.motion_dim))

    def motion_embeddings(self, features: Tensor) -> Tensor:
        """De-normalised features [B, T, 263] -> mean-token embeddings [B, latent]."""
        x = (features - self.motion_mean) / (self.motion_std + self.config.std_eps)  # [B, T, 263]
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)  # [B, T]
        return self.motion_encoder(x, mask)[:, 0]  # [B, latent]

    def text_embeddings(self, token_features: Tensor, mask: Tensor) -> Tensor:
        """Text-model token features [B, L, text_dim] and mask [B, L] -> mean-token embeddings [B, latent]."""
        return self.text_encoder(token_features, mask)[:, 0]  # [B, latent]


def prefixed(prefix: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A TMR encoder's state dict under `prefix`, without the stored positional table (recomputed here)."""
    return {prefix + key: value for key, value in state.items() if not key.startswith("sequence_pos_encoding.")}


MOTION_WORDS = (
    "a", "person", "man", "woman", "someone", "the", "his", "her", "and", "then", "while", "to", "of", "in", "around",
    "walk", "walks", "run", "runs", "jump", "jumps", "hop", "turn", "turns", "wave", "waves", "raise", "raises",
    "kick", "kicks", "sit", "sits", "stand", "squat", "forward", "backward", "left", "right", "up", "down", "hand",
    "hands", "arm", "arms", "leg", "slowly", "quickly", "once", "twice", "three", "times", "degrees", "meters",
)
"""The words the tiny tokenizers and word table know whole (anything else spells out letter by letter or is unk)."""


def tiny_wordpiece_tokenizer():
    """A BERT-style WordPiece tokenizer over MOTION_WORDS plus single letters, digits and punctuation (so every
    lower-case ASCII text tokenises): [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4, texts as [CLS] ... [SEP]."""
    import string

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = [*string.ascii_lowercase, *("##" + c for c in string.ascii_lowercase), *string.digits,
              *string.punctuation]
    vocab = {token: i for i, token in enumerate(dict.fromkeys([*specials, *MOTION_WORDS, *pieces]))}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    backend.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=64)


def tiny_distilbert(dim: int, seed: int = 0):
    """A random one-layer DistilBERT of width `dim` and its tiny WordPiece tokenizer."""
    from transformers import DistilBertConfig, DistilBertModel

    tokenizer = tiny_wordpiece_tokenizer()
    config = DistilBertConfig(vocab_size=len(tokenizer), dim=dim, hidden_dim=2 * dim, n_layers=1, n_heads=2,
                              max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id)
    return seeded(seed, lambda: DistilBertModel(config)), tokenizer


def write_tmr_folder(folder: str | Path, encoders: TmrEncoders, text_model, tokenizer) -> Path:
    """Write the diffrl TMR folder (module docstring): config, encoders with statistics, DistilBERT in distilbert/."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = TmrConfig(**{**asdict(encoders.config), "text_model": "distilbert"})
    write_config(config, folder / CONFIG)
    save_tensors(encoders, folder / TMR_WEIGHTS)
    text_model.save_pretrained(folder / "distilbert")
    tokenizer.save_pretrained(folder / "distilbert")
    return folder


def convert_tmr(out: str | Path, *, motion_encoder: dict[str, Tensor], text_encoder: dict[str, Tensor], mean: Tensor,
                std: Tensor, distilbert: str, **config) -> Path:
    """Write a diffrl TMR folder from the public release's parts (layout assumed as the module docstring says):
    the two encoders' state dicts (torch.load of motion_encoder.pt / text_encoder.pt), the feature statistics
    [263] (mean.pt / std.pt) and a DistilBERT folder or cached hub id; `config`: TmrConfig fields that differ."""
    from transformers import AutoTokenizer, DistilBertModel

    encoders = TmrEncoders(TmrConfig(**config))
    state = {**prefixed("motion_encoder.", motion_encoder), **prefixed("text_encoder.", text_encoder),
             "motion_mean": torch.as_tensor(mean).float(), "motion_std": torch.as_tensor(std).float()}
    load_tensors(encoders, state, "the given TMR state dicts")
    text_folder = resolve_folder(distilbert, reward="tmr", what="DistilBERT model", needs=("config.json",),
                                 fix_arg="distilbert")
    text_model = DistilBertModel.from_pretrained(text_folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(text_folder, local_files_only=True)
    return write_tmr_folder(out, encoders, text_model, tokenizer)


class MotionModelReward(ModelReward):
    """A text-motion model reward: scores de-normalised HumanML3D features, differentiably; `model` is a diffrl
    weights folder (module docstring), a hub repo id of one in the HF cache, or "tiny"."""

    accepts = ("motion",)
    differentiable = True
    default_model = None  # no published weights in these folder layouts: the user converts them


def random_statistics(module: nn.Module) -> None:
    """Tiny weights' feature statistics, far from (0, 1) so that the normalisation shows: `module.motion_mean` and
    `module.motion_std` [263] drawn from a fixed generator."""
    generator = torch.Generator().manual_seed(1)
    module.motion_mean.copy_(torch.randn(FEATURES, generator=generator))
    module.motion_std.copy_(0.5 + torch.rand(FEATURES, generator=generator))


@register_reward("tmr")
class TmrReward(MotionModelReward):
    """cosine(TMR text embedding, TMR motion embedding) of de-normalised HumanML3D features (module docstring)."""

    def _load(self) -> None:
        from transformers import AutoTokenizer, DistilBertModel

        if self.model == TINY:
            self.encoders = seeded(0, lambda: TmrEncoders(TINY_TMR))
            random_statistics(self.encoders)
            self.text_model, self.tokenizer = tiny_distilbert(TINY_TMR.text_dim)
        else:
            folder = weights_folder(self.model, reward="tmr", needs=(CONFIG, TMR_WEIGHTS))
            from safetensors.torch import load_file

            self.encoders = TmrEncoders(read_config(TmrConfig, folder / CONFIG))
            load_tensors(self.encoders, load_file(str(folder / TMR_WEIGHTS)), folder / TMR_WEIGHTS)
            spec = self.encoders.config.text_model
            text_folder = folder / spec if (folder / spec).is_dir() else resolve_folder(
                spec, reward="tmr", what="DistilBERT model (config.json's text_model)", needs=("config.json",))
            self.text_model = DistilBertModel.from_pretrained(text_folder, local_files_only=True,
                                                              **dtype_kwarg(self.dtype))
            self.tokenizer = AutoTokenizer.from_pretrained(text_folder, local_files_only=True)
        if self.text_model.config.dim != self.encoders.config.text_dim:
            raise ValueError(f"reward 'tmr': the text model's width is {self.text_model.config.dim} but the text "
                             f"encoder reads {self.encoders.config.text_dim} (config.json's text_dim)")
        self.encoders.to(self.dtype)
        self.text_model.to(self.dtype)

    def _modules(self) -> list[nn.Module]:
        return [self.encoders, self.text_model]

    def save(self, folder: str | Path) -> Path:
        """Write the loaded weights as a diffrl TMR folder (tiny weights too: they reload exactly)."""
        self.load()
        return write_tmr_folder(folder, self.encoders, self.text_model, self.tokenizer)

    def motion_embeddings(self, features: Tensor) -> Tensor:
        """De-normalised features [B, T, 263] -> embeddings [B, latent] (not unit-norm), in the model's dtype."""
        check_features(features, "tmr")
        self._ready(features)
        return self.encoders.motion_embeddings(features.to(self.dtype))  # [B, latent]

    def text_embeddings(self, prompts: list[str], device: torch.device) -> Tensor:
        """Prompts -> embeddings [B, latent] (not unit-norm): DistilBERT token features through the text encoder."""
        self.load()
        tokens = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
        mask = tokens["attention_mask"].to(device)  # [B, L]
        features = self.text_model(input_ids=tokens["input_ids"].to(device), attention_mask=mask).last_hidden_state
        return self.encoders.text_embeddings(features, mask.bool())  # [B, latent]

    def score(self, samples: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        motion = self.motion_embeddings(samples)  # [B, latent]
        with torch.no_grad():
            text = self.text_embeddings(prompts, samples.device)  # [B, latent]
        return (F.normalize(text, dim=-1) * F.normalize(motion, dim=-1)).sum(-1)  # [B]


# ---- T2M evaluator ---------------------------------------------------------------------------------------------
class MovementConvEncoder(nn.Module):
    """Two stride-2 convolutions over time (kernel 4, padding 1: T -> T // 2 -> T // 4) and a linear layer. The
    parameter names (main, out_net) are the reference's, so its state dict loads unchanged."""

    def __init__(self, input_size: int, hidden_size: int, output_size: int):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv1d(input_size, hidden_size, 4, 2, 1), nn.Dropout(0.2), nn.LeakyReLU(0.2),
            nn.Conv1d(hidden_size, output_size, 4, 2, 1), nn.Dropout(0.2), nn.LeakyReLU(0.2))
        self.out_net = nn.Linear(output_size, output_size)

    def forward(self, x: Tensor) -> Tensor:
        """[B, T, input] -> [B, T // 4, output]."""
        h = self.main(x.transpose(1, 2)).transpose(1, 2)  # [B, T // 4, output]
        return self.out_net(h)


class BiGruEncoder(nn.Module):
    """The reference's MotionEncoderBiGRUCo (pos_size None) and TextEncoderBiGRUCo (pos_size 15): embed (text: word
    vector + a linear map of the tag one-hot), a bidirectional GRU from a learned initial state over the real steps,
    and an MLP on the two directions' final states. Parameter names are the reference's."""

    def __init__(self, input_size: int, hidden_size: int, output_size: int, pos_size: int | None = None):
        super().__init__()
        if pos_size is not None:
            self.pos_emb = nn.Linear(pos_size, input_size)
        self.input_emb = nn.Linear(input_size, hidden_size)
        self.gru = nn.GRU(hidden_size, hidden_size, batch_first=True, bidirectional=True)
        self.output_net = nn.Sequential(nn.Linear(2 * hidden_size, hidden_size), nn.LayerNorm(hidden_size),
                                        nn.LeakyReLU(0.2), nn.Linear(hidden_size, output_size))
        self.hidden = nn.Parameter(torch.randn(2, 1, hidden_size))

    def forward(self, x: Tensor, lengths: Tensor, pos_onehot: Tensor | None = None) -> Tensor:
        """x [B, L, input] (+ pos_onehot [B, L, 15]), lengths [B] of real steps -> embeddings [B, output]."""
        if pos_onehot is not None:
            x = x + self.pos_emb(pos_onehot)  # [B, L, input]
        steps = self.input_emb(x)  # [B, L, hidden]
        packed = pack_padded_sequence(steps, lengths.cpu(), batch_first=True, enforce_sorted=False)
        initial = self.hidden.expand(-1, x.shape[0], -1).contiguous()  # [2, B, hidden]
        _, final = self.gru(packed, initial)  # [2, B, hidden]: forward and backward directions
        return self.output_net(torch.cat([final[0], final[1]], dim=-1))  # [B, output]


class T2mEvaluator(nn.Module):
    """The T2M evaluator's three encoders with the motion statistics they expect."""

    def __init__(self, config: T2mConfig):
        super().__init__()
        self.config = config
        self.movement_encoder = MovementConvEncoder(config.motion_dim - CONTACT_DIMS, config.movement_hidden,
                                                    config.movement_latent)
        self.motion_encoder = BiGruEncoder(config.movement_latent, config.motion_hidden, config.embedding_dim)
        self.text_encoder = BiGruEncoder(config.word_dim, config.text_hidden, config.embedding_dim,
                                         pos_size=len(POS_TAGS))
        self.register_buffer("motion_mean", torch.zeros(config.motion_dim))
        self.register_buffer("motion_std", torch.ones(config.motion_dim))

    def motion_embeddings(self, features: Tensor) -> Tensor:
        """De-normalised features [B, T, 263] -> embeddings [B, embedding_dim]; all T // 4 movement steps count."""
        x = (features - self.motion_mean) / self.motion_std  # [B, T, 263]
        movements = self.movement_encoder(x[..., :-CONTACT_DIMS])  # [B, T // 4, movement_latent]
        lengths = torch.full((x.shape[0],), movements.shape[1], dtype=torch.long)  # [B]
        return self.motion_encoder(movements, lengths)  # [B, embedding_dim]

    def text_embeddings(self, word_vectors: Tensor, pos_onehot: Tensor, lengths: Tensor) -> Tensor:
        """word_vectors [B, L, word_dim], pos_onehot [B, L, 15], lengths [B] -> embeddings [B, embedding_dim]."""
        return self.text_encoder(word_vectors, lengths, pos_onehot)


class WordTable:
    """The text side's inputs without GloVe files or spaCy: word vectors by word, tags by word, lemmas by word."""

    def __init__(self, words: list[str], vectors: Tensor, pos: dict[str, str] | None = None,
                 lemmas: dict[str, str] | None = None):
        if vectors.ndim != 2 or vectors.shape[0] != len(words):
            raise ValueError(f"word table: {len(words)} words but word_vectors of shape {list(vectors.shape)}; "
                             f"row i must be the vector of words[i]")
        if "unk" not in words:
            raise ValueError("word table: the words must include 'unk' (the vector of every unknown word)")
        bad = sorted({tag for tag in (pos or {}).values() if tag not in POS_TAGS})
        if bad:
            raise ValueError(f"word table: unknown part-of-speech tags {bad}; valid tags are {list(POS_TAGS)}")
        self.words, self.vectors = list(words), vectors
        self.index = {word: i for i, word in enumerate(self.words)}
        self.pos, self.lemmas = dict(pos or {}), dict(lemmas or {})

    def tokens(self, prompt: str, max_words: int) -> list[tuple[int, str]]:
        """(word-vector row, tag) per token of `prompt`: sos, at most `max_words` words, eos. Unknown words read as
        'unk' with tag OTHER; a known word's tag is its motion class if it has one (VIP_WORDS), else the table's."""
        words = re.findall(r"[^\W\d_]+", prompt.replace("-", "").lower())[:max_words]
        out = [self._lookup("sos", "OTHER")]
        for word in words:
            lemma = self.lemmas.get(word, word)
            out.append(self._lookup(lemma, VIP_TAG.get(lemma) or self.pos.get(word) or self.pos.get(lemma) or "OTHER"))
        return out + [self._lookup("eos", "OTHER")]

    def _lookup(self, word: str, tag: str) -> tuple[int, str]:
        return (self.index[word], tag) if word in self.index else (self.index["unk"], "OTHER")

    def batch(self, prompts: list[str], max_words: int) -> tuple[Tensor, Tensor, Tensor]:
        """Word vectors [B, L, word_dim], tag one-hots [B, L, 15] (zero-padded) and lengths [B] of `prompts`."""
        encoded = [self.tokens(p, max_words) for p in prompts]
        lengths = torch.tensor([len(tokens) for tokens in encoded])  # [B]
        rows = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long)  # [B, L]
        pos_onehot = torch.zeros(len(prompts), int(lengths.max()), len(POS_TAGS), dtype=self.vectors.dtype)
        for b, tokens in enumerate(encoded):
            for t, (row, tag) in enumerate(tokens):
                rows[b, t] = row
                pos_onehot[b, t, POS_TAGS.index(tag)] = 1
        vectors = self.vectors[rows] * (torch.arange(rows.shape[1]) < lengths[:, None])[..., None]  # [B, L, word_dim]
        return vectors, pos_onehot, lengths


def tiny_word_table(word_dim: int, seed: int = 2) -> WordTable:
    """Random vectors for 'unk', 'sos', 'eos' and the lemmas of MOTION_WORDS, with their tags and lemmas."""
    lemmas = {w: w[:-1] for w in MOTION_WORDS if w.endswith("s") and w[:-1] in MOTION_WORDS}  # walks -> walk
    words = ["unk", "sos", "eos", *(w for w in MOTION_WORDS if w not in lemmas)]
    tags = {"a": "DET", "the": "DET", "his": "PRON", "her": "PRON", "someone": "PRON", "and": "OTHER", "to": "ADP",
            "of": "ADP", "in": "ADP", "around": "ADV", "then": "ADV", "while": "ADP", "once": "ADV", "twice": "ADV",
            "three": "NUM", "person": "NOUN", "man": "NOUN", "woman": "NOUN", "times": "NOUN", "degrees": "NOUN",
            "meters": "NOUN", "wave": "VERB"}
    vectors = torch.randn(len(words), word_dim, generator=torch.Generator().manual_seed(seed))
    return WordTable(words, vectors, tags, lemmas)


def write_t2m_folder(folder: str | Path, evaluator: T2mEvaluator, table: WordTable) -> Path:
    """Write the diffrl T2M evaluator folder (module docstring)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_config(evaluator.config, folder / CONFIG)
    save_tensors(evaluator, folder / T2M_WEIGHTS, {"word_vectors": table.vectors})
    (folder / T2M_VOCABULARY).write_text(json.dumps({"words": table.words, "pos": table.pos, "lemmas": table.lemmas},
                                                    indent=1) + "\n")
    return folder


def convert_t2m(out: str | Path, *, checkpoint: dict[str, dict[str, Tensor]], mean: Tensor, std: Tensor,
                words: list[str], vectors: Tensor, pos: dict[str, str] | None = None,
                lemmas: dict[str, str] | None = None, **config) -> Path:
    """Write a diffrl T2M evaluator folder from the public release's parts (layout assumed as the module docstring
    says): `checkpoint` the loaded finest.tar (state dicts under 'movement_encoder', 'motion_encoder',
    'text_encoder'), the evaluator's feature statistics [263], the GloVe words and vectors [V, 300] (row i: words[i];
    'unk', 'sos', 'eos' among them), optional tag and lemma lookups; `config`: T2mConfig fields that differ."""
    evaluator = T2mEvaluator(T2mConfig(**config))
    state = {f"{part}.{key}": value for part in ("movement_encoder", "motion_encoder", "text_encoder")
             for key, value in checkpoint[part].items()}
    state.update(motion_mean=torch.as_tensor(mean).float(), motion_std=torch.as_tensor(std).float())
    load_tensors(evaluator, state, "the given T2M checkpoint")
    return write_t2m_folder(out, evaluator, WordTable(words, torch.as_tensor(vectors).float(), pos, lemmas))


@register_reward("t2m_evaluator")
class T2mEvaluatorReward(MotionModelReward):
    """Minus the Euclidean distance between the T2M evaluator's text and motion embeddings (the negative of one
    pair's MM-Dist; module docstring)."""

    def _load(self) -> None:
        if self.model == TINY:
            self.evaluator = seeded(0, lambda: T2mEvaluator(TINY_T2M))
            random_statistics(self.evaluator)
            self.table = tiny_word_table(TINY_T2M.word_dim)
        else:
            from safetensors.torch import load_file

            folder = weights_folder(self.model, reward="t2m_evaluator", needs=(CONFIG, T2M_WEIGHTS, T2M_VOCABULARY))
            self.evaluator = T2mEvaluator(read_config(T2mConfig, folder / CONFIG))
            state = load_file(str(folder / T2M_WEIGHTS))
            vectors = state.pop("word_vectors", None)
            if vectors is None:
                raise ValueError(f"{folder / T2M_WEIGHTS} lacks the tensor 'word_vectors' [V, word_dim]")
            load_tensors(self.evaluator, state, folder / T2M_WEIGHTS)
            vocabulary = json.loads((folder / T2M_VOCABULARY).read_text())
            self.table = WordTable(vocabulary["words"], vectors, vocabulary.get("pos"), vocabulary.get("lemmas"))
        if self.table.vectors.shape[1] != self.evaluator.config.word_dim:
            raise ValueError(f"reward 't2m_evaluator': word vectors are {self.table.vectors.shape[1]}-d but the text "
                             f"encoder reads {self.evaluator.config.word_dim} (config.json's word_dim)")
        self.evaluator.to(self.dtype)
        self.table.vectors = self.table.vectors.to(self.dtype)

    def _modules(self) -> list[nn.Module]:
        return [self.evaluator]

    def save(self, folder: str | Path) -> Path:
        """Write the loaded weights as a diffrl T2M evaluator folder (tiny weights too: they reload exactly)."""
        self.load()
        return write_t2m_folder(folder, self.evaluator, self.table)

    def motion_embeddings(self, features: Tensor) -> Tensor:
        """De-normalised features [B, T, 263], T >= 4 -> embeddings [B, embedding_dim], in the model's dtype."""
        check_features(features, "t2m_evaluator", min_frames=UNIT_LENGTH)
        self._ready(features)
        return self.evaluator.motion_embeddings(features.to(self.dtype))  # [B, D]

    def text_embeddings(self, prompts: list[str], device: torch.device) -> Tensor:
        """Prompts -> embeddings [B, embedding_dim] through the word table and the text encoder."""
        self.load()
        vectors, pos_onehot, lengths = self.table.batch(prompts, self.evaluator.config.max_text_len)
        return self.evaluator.text_embeddings(vectors.to(device), pos_onehot.to(device), lengths)  # [B, D]

    def score(self, samples: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        motion = self.motion_embeddings(samples)  # [B, D]
        with torch.no_grad():
            text = self.text_embeddings(prompts, samples.device)  # [B, D]
        return -(text - motion).norm(dim=-1)  # [B]
