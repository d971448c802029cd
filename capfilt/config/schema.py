"""The recipe schema: one typed dataclass per section, a docstring per field.

A recipe (``recipes/*.yaml``) is a mapping with the sections below; any section or field left
out takes the default written here. ``capfilt config explain`` prints this schema.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from capfilt.config.core import ConfigError

NOISE_KINDS = ("swap", "attribute", "generic")
"""Kinds of web-text noise in the built-in benchmark: a caption of another image, one attribute
wrong, generic alt-text."""


@dataclass
class SynthConfig:
    """The built-in benchmark world (``capfilt data synth``)."""

    seed: int = 0
    """Master seed; every shard derives its own generator from (seed, split, shard index)."""
    image_size: int = 64
    """Side of the square rendered images, in pixels."""
    n_human: int = 2000
    """Images in ``human/`` (clean, several captions each: the COCO of this world)."""
    n_web: int = 6000
    """Images in ``web/`` (one noisy alt-text each)."""
    n_test: int = 500
    """Images in ``test/`` (clean, held out, for retrieval evaluation)."""
    captions_per_human: int = 5
    """Human captions written for each ``human/`` image."""
    captions_per_test: int = 5
    """Reference captions written for each ``test/`` image."""
    max_objects: int = 2
    """Objects per scene are drawn uniformly from 1..max_objects (1 or 2 are supported)."""
    noise_rate: float = 0.4
    """Fraction of ``web/`` texts that are wrong for their image."""
    noise_mix: dict[str, float] = field(
        default_factory=lambda: {"swap": 0.4, "attribute": 0.4, "generic": 0.2}
    )
    """Relative weights of the noise kinds among noisy web texts (swap, attribute, generic)."""
    shard_size: int = 1000
    """Samples per output shard."""
    jpeg_quality: int = 95
    """JPEG quality of the rendered images."""

    def validate(self) -> None:
        if self.image_size < 16:
            raise ConfigError("synth.image_size: must be at least 16")
        for name in ("n_human", "n_web", "n_test"):
            if getattr(self, name) < 0:
                raise ConfigError(f"synth.{name}: must be >= 0")
        if not 0.0 <= self.noise_rate <= 1.0:
            raise ConfigError("synth.noise_rate: must be in [0, 1]")
        if self.max_objects not in (1, 2):
            raise ConfigError("synth.max_objects: only 1 or 2 objects per scene are supported")
        for kind, weight in self.noise_mix.items():
            if kind not in NOISE_KINDS:
                raise ConfigError(
                    f"synth.noise_mix.{kind}: unknown noise kind (known: {', '.join(NOISE_KINDS)})"
                )
            if weight < 0:
                raise ConfigError(f"synth.noise_mix.{kind}: weight must be >= 0")
        if self.noise_rate > 0 and sum(self.noise_mix.values()) <= 0:
            raise ConfigError("synth.noise_mix: weights must not all be zero when noise_rate > 0")
        if self.shard_size < 1:
            raise ConfigError("synth.shard_size: must be >= 1")
        if self.captions_per_human < 1 or self.captions_per_test < 1:
            raise ConfigError("synth.captions_per_human/captions_per_test: must be >= 1")


ImagePool = Literal["cls", "mean"]
WeightInit = Literal["bert", "fan_in"]
IMAGE_POOLS = get_args(ImagePool)
WEIGHT_INITS = get_args(WeightInit)


@dataclass
class ModelConfig:
    """The MED model: ViT image encoder + BERT-style text encoder/decoder (docs/architecture.md §1)."""

    image_size: int = 224
    """Input image side in pixels."""
    patch_size: int = 16
    """ViT patch side in pixels."""
    vision_width: int = 768
    """ViT hidden size."""
    vision_depth: int = 12
    """ViT transformer blocks."""
    vision_heads: int = 12
    """ViT attention heads."""
    vision_checkpoint: str | None = None
    """Local timm checkpoint (safetensors/.pth) or timm model name to initialise the ViT; None = from scratch."""
    drop_path: float = 0.0
    """Stochastic depth rate of the ViT."""
    text_width: int = 768
    """BERT hidden size."""
    text_layers: int = 12
    """BERT layers (shared by encoder and decoder except self-attention)."""
    text_heads: int = 12
    """BERT attention heads."""
    text_intermediate: int = 3072
    """BERT feed-forward size."""
    text_dropout: float = 0.1
    """Dropout of the text stack, hidden states and attention probabilities (BERT/BLIP: 0.1)."""
    text_checkpoint: str | None = None
    """Local BERT checkpoint folder (or hub id when online) to initialise the text stack; None = from scratch."""
    tokenizer: str | None = None
    """Tokenizer folder or hub id; None = train a WordPiece tokenizer on the training captions."""
    vocab_size: int = 2000
    """Vocabulary size when the tokenizer is trained here."""
    max_text_len: int = 35
    """Tokens per text, special tokens included (BLIP: 35 pretrain, 40 caption)."""
    embed_dim: int = 256
    """ITC projection size."""
    queue_size: int = 57600
    """Momentum feature queue length (any length: writes wrap around; 0 = ITC against the global batch only)."""
    momentum: float = 0.995
    """Momentum-encoder EMA rate."""
    alpha: float = 0.4
    """Momentum-distillation weight of the soft ITC targets."""
    temp: float = 0.07
    """Initial ITC temperature (learnable, clamped to [0.001, 0.5])."""
    weight_init: WeightInit = "bert"
    """Initial weights of every linear and embedding layer trained from scratch: ``bert`` (normal,
    std 0.02, as BERT and timm's ViT) or ``fan_in`` (normal, std 1/sqrt(fan_in)). At widths far below
    768, std 0.02 leaves cross-attention and the ITM head with almost no signal for hundreds of steps."""
    image_pool: ImagePool = "cls"
    """ITC image feature from the ViT's ``cls`` token (BLIP) or the ``mean`` of its patch tokens.
    From scratch, ``mean`` learns in tens of steps where the [CLS] token stays collapsed for hundreds."""
    grad_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""

    def validate(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError("model.image_size: must be a multiple of model.patch_size")
        if self.vision_width % self.vision_heads:
            raise ConfigError("model.vision_width: must be divisible by model.vision_heads")
        if self.text_width % self.text_heads:
            raise ConfigError("model.text_width: must be divisible by model.text_heads")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError("model.alpha: must be in [0, 1]")
        if self.queue_size < 0:
            raise ConfigError("model.queue_size: must be >= 0")
        # the recipe loader checks the Literal choices; this also covers configs built in code
        if self.weight_init not in WEIGHT_INITS:
            raise ConfigError(
                f"model.weight_init: one of {', '.join(WEIGHT_INITS)}, got '{self.weight_init}'"
            )
        if self.image_pool not in IMAGE_POOLS:
            raise ConfigError(
                f"model.image_pool: one of {', '.join(IMAGE_POOLS)}, got '{self.image_pool}'"
            )


@dataclass
class DataConfig:
    """How training reads shards."""

    shards: list[str] = field(default_factory=list)
    """Shard sources (brace patterns, folders, files); the command line's --shards replaces this."""
    weights: list[float] = field(default_factory=list)
    """Sampling weight per source (empty = proportional to their sizes)."""
    batch_size: int = 32
    """Samples per step on each rank."""
    num_workers: int = 2
    """DataLoader worker processes per rank."""
    shuffle_buffer: int = 1000
    """Sample shuffle buffer per worker."""
    max_words: int = 30
    """Captions are cut to this many words (docs/architecture.md §5)."""
    crop_scale: tuple[float, float] = (0.5, 1.0)
    """RandomResizedCrop scale range for training images."""
    hflip: bool = True
    """Random horizontal flip in training. Off for data where left/right is in the caption."""
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    """Image normalisation mean (CLIP's, as BLIP)."""
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    """Image normalisation std (CLIP's, as BLIP)."""

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("data.batch_size: must be >= 1")
        if self.weights and self.shards and len(self.weights) != len(self.shards):
            raise ConfigError("data.weights: needs one weight per shard source")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError("data.crop_scale: must satisfy 0 < low <= high <= 1")


@dataclass
class TrainConfig:
    """Optimisation of a training stage (pretrain or fine-tune)."""

    epochs: int = 20
    """Passes over ``samples_per_epoch`` samples."""
    samples_per_epoch: int = 0
    """Samples that make one epoch (0 = the total size of the training shards)."""
    lr: float = 3e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.05
    """AdamW weight decay (not applied to norms and biases)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_steps: int = 3000
    """Linear warm-up steps from ``warmup_lr`` to ``lr``."""
    warmup_lr: float = 1e-6
    """Learning rate at step 0."""
    schedule: Literal["step", "cosine"] = "step"
    """After warm-up: per-epoch decay by ``lr_decay_rate`` (BLIP pretrain) or cosine to ``min_lr``."""
    lr_decay_rate: float = 0.9
    """Per-epoch decay factor of the step schedule."""
    min_lr: float = 0.0
    """Floor of the learning rate."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimiser step."""
    clip_grad: float = 0.0
    """Clip the global gradient norm to this value (0 = off)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto = bf16 autocast on GPU, fp32 on CPU."""
    alpha_ramp_epochs: float = 1.0
    """Momentum-distillation alpha ramps linearly from 0 over this many epochs."""
    log_every: int = 10
    """Optimiser steps between metric lines."""
    ckpt_every: int = 200
    """Optimiser steps between checkpoints (a checkpoint is also written at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (the newest ones)."""
    compile: bool = False
    """Run the training step through ``torch.compile`` (inductor). Pays a compile of tens of
    seconds to minutes at start-up for faster steps on GPU; the saved weights are the same model's."""

    def validate(self) -> None:
        if self.grad_accum < 1:
            raise ConfigError("train.grad_accum: must be >= 1")
        if self.epochs < 1:
            raise ConfigError("train.epochs: must be >= 1")


@dataclass
class CaptionConfig:
    """Synthetic captions (``capfilt caption``)."""

    num_captions: int = 1
    """Synthetic captions per image."""
    method: Literal["nucleus", "beam", "greedy"] = "nucleus"
    """Nucleus sampling (BLIP's choice for CapFilt: diverse captions), beam search, or greedy."""
    top_p: float = 0.9
    """Nucleus mass."""
    temperature: float = 1.0
    """Softmax temperature of sampling."""
    repetition_penalty: float = 1.1
    """CTRL-style penalty on tokens already generated."""
    num_beams: int = 3
    """Beams for beam search."""
    min_length: int = 5
    """Minimum generated tokens before [SEP] is allowed."""
    max_length: int = 30
    """Maximum generated tokens."""
    prompt: str = "a picture of "
    """Caption prompt, stripped from the output."""
    batch_size: int = 64
    """Images per generation batch."""
    seed: int = 0
    """Sampling seed; each caption's draws depend on (seed, sample key), so output does not depend
    on ranks, batches or shard splits."""
    num_workers: int = 0
    """DataLoader processes decoding and transforming images (0 = in the main process)."""


FilterRule = Literal["itm", "itc", "both"]
FILTER_RULES = get_args(FilterRule)


@dataclass
class FilterConfig:
    """Filtering (``capfilt filter``): which web and synthetic texts stay. Human texts always stay;
    a text with no origin is judged as web alt-text, and any other origin is judged like web."""

    rule: FilterRule = "itm"
    """Which score decides: ``itm`` (BLIP: the ITM match probability softmax(itm)[1]), ``itc``
    (CLIP-score style, as DataComp filters: the cosine of the image and text ITC features), or
    ``both`` (a text must pass both)."""
    threshold: float = 0.5
    """ITM rule: keep a text when softmax(itm)[1] is above this (a probability, in [0, 1])."""
    itc_threshold: float = 0.3
    """ITC rule: keep a text when its ITC cosine with the image is above this (in [-1, 1])."""
    keep_fraction: float | None = None
    """Keep this fraction of the judged texts instead of using the fixed thresholds: each score's
    threshold becomes its quantile over the whole run (every shard is scored first, then decided).
    Under ``both`` a text must be in the top fraction by both scores, so fewer may stay.
    None = the fixed thresholds."""
    batch_size: int = 64
    """Images per scoring batch."""
    num_workers: int = 0
    """DataLoader processes decoding and transforming images (0 = in the main process)."""

    def validate(self) -> None:
        if self.rule not in FILTER_RULES:
            raise ConfigError(f"filter.rule: one of {', '.join(FILTER_RULES)}, got '{self.rule}'")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(
                f"filter.threshold: an ITM probability, must be in [0, 1], got {self.threshold}"
            )
        if not -1.0 <= self.itc_threshold <= 1.0:
            raise ConfigError(
                f"filter.itc_threshold: a cosine, must be in [-1, 1], got {self.itc_threshold}"
            )
        if self.keep_fraction is not None and not 0.0 < self.keep_fraction <= 1.0:
            raise ConfigError(
                f"filter.keep_fraction: must be in (0, 1] (or null), got {self.keep_fraction}"
            )
        if self.batch_size < 1:
            raise ConfigError("filter.batch_size: must be >= 1")


@dataclass
class EvalConfig:
    """Evaluation (``capfilt eval``)."""

    k: int = 256
    """Candidates re-ranked by ITM per query (0 = ITC only)."""
    batch_size: int = 64
    """Images or texts per feature batch."""
    num_workers: int = 0
    """DataLoader processes decoding and transforming test images (0 = in the main process)."""


@dataclass
class FinetuneConfig:
    """Fine-tuning of the captioner and the filter (docs/architecture.md §3 step 2)."""

    captioner: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            epochs=5, lr=1e-5, warmup_steps=0, schedule="cosine", weight_decay=0.05
        )
    )
    """Captioner optimisation (LM only)."""
    filter: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            epochs=6, lr=1e-5, warmup_steps=0, schedule="cosine", weight_decay=0.05
        )
    )
    """Filter optimisation (ITC + ITM)."""


@dataclass
class RuntimeConfig:
    """How a process uses the machine it runs on."""

    threads: int = 0
    """Intra-op threads per process (torch.set_num_threads). 0 = auto: ``OMP_NUM_THREADS`` when
    set, else this rank's share of the cores (CPU affinity ÷ ranks on the node) less one core per
    ``data.num_workers`` loader process and one for everything else, at least 1. Small models on a
    few cores train fastest without oversubscription (benchmarks/threads.py); on an idle 2-core
    machine set 2."""

    def validate(self) -> None:
        if self.threads < 0:
            raise ConfigError("runtime.threads: must be >= 0 (0 = auto)")


@dataclass
class Recipe:
    """A whole recipe: every stage's settings."""

    name: str = "custom"
    """Recipe name, for logs and run folders."""
    seed: int = 0
    """Seed of training stages (weights init, data order, sampling)."""
    synth: SynthConfig = field(default_factory=SynthConfig)
    """The built-in benchmark world."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The MED model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data loading."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Pretraining optimisation."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """Captioner/filter fine-tuning."""
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    """Synthetic captioning."""
    filter: FilterConfig = field(default_factory=FilterConfig)
    """Filtering of web and synthetic texts."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    """Threads and other per-process settings."""


RUNTIME_SECTIONS = ("runtime",)
"""Recipe sections that say how a process uses its machine, not what it computes."""


def recipe_identity(recipe: Recipe | dict) -> dict:
    """The recipe as a dict without :data:`RUNTIME_SECTIONS`: what decides a run's results, so a
    resumed run or a re-run of ``capfilt bootstrap`` may change its thread count."""
    from capfilt.config.core import to_dict

    data = recipe if isinstance(recipe, dict) else to_dict(recipe)
    return {k: v for k, v in data.items() if k not in RUNTIME_SECTIONS}
