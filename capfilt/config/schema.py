"""The recipe schema: one typed dataclass per section, a docstring per field.

A recipe (``capfilt/recipes/*.yaml``) is a mapping with the sections below; any section or field left
out takes the default written here. ``capfilt config explain`` prints this schema.

Each section's ``validate()`` checks its ranges when the recipe loads, so that a value no stage
can use (a batch size of 0, ``top_p=5``, ``ckpt_every=0``) exits 2 naming its key instead of
failing, or silently doing something else, hours into a job. Its messages name keys within the
section; the loader adds the section's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from capfilt.config.core import ConfigError, check

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
    """Relative weights of the noise kinds among noisy web texts (swap, attribute, generic).
    The kinds a recipe or ``--set synth.noise_mix.KIND=W`` names change; the others keep their
    weight (0 leaves a kind out)."""
    web_terse_rate: float = 0.0
    """Fraction of the ``web/`` texts that are terse: naming only each object's colour and shape
    ("a red circle and a blue square": no size, place or relation), as web alt-text often says
    less than a caption. Wrong texts are terse at the same rate (another scene's terse text, or
    one colour or shape wrong); generic junk is neither. 0 makes every web text that describes a
    scene a full caption, as informative as the human ones."""
    shard_size: int = 1000
    """Samples per output shard."""
    jpeg_quality: int = 95
    """JPEG quality of the rendered images."""

    def validate(self) -> None:
        check(self.image_size >= 16, "image_size", "at least 16", self.image_size)
        for name in ("n_human", "n_web", "n_test"):
            check(getattr(self, name) >= 0, name, ">= 0", getattr(self, name))
        check(0.0 <= self.noise_rate <= 1.0, "noise_rate", "in [0, 1]", self.noise_rate)
        check(0.0 <= self.web_terse_rate <= 1.0, "web_terse_rate", "in [0, 1]", self.web_terse_rate)
        check(self.max_objects in (1, 2), "max_objects", "1 or 2", self.max_objects)
        for kind, weight in self.noise_mix.items():
            if kind not in NOISE_KINDS:
                raise ConfigError(
                    f"noise_mix.{kind}: unknown noise kind (known: {', '.join(NOISE_KINDS)})"
                )
            check(weight >= 0, f"noise_mix.{kind}", ">= 0", weight)
        if self.noise_rate > 0 and sum(self.noise_mix.values()) <= 0:
            raise ConfigError("noise_mix: weights must not all be zero when noise_rate > 0")
        check(self.shard_size >= 1, "shard_size", ">= 1", self.shard_size)
        for name in ("captions_per_human", "captions_per_test"):
            check(getattr(self, name) >= 1, name, ">= 1", getattr(self, name))
        check(1 <= self.jpeg_quality <= 100, "jpeg_quality", "in [1, 100]", self.jpeg_quality)


ItmNegatives = Literal["hard", "random", "mixed"]
ITM_NEGATIVES = get_args(ItmNegatives)
"""How ITM negatives are drawn (``train.itm_negatives``; capfilt.model.losses.sample_itm_negatives)."""

ImagePool = Literal["cls", "mean"]
TextPool = Literal["cls", "mean"]
WeightInit = Literal["bert", "fan_in"]
IMAGE_POOLS = get_args(ImagePool)
TEXT_POOLS = get_args(TextPool)
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
    """Tokens per text, special tokens included; the captioner's prompt comes on top (BLIP: 35,
    and 40 with the prompt for captioning)."""
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
    text_pool: TextPool = "cls"
    """ITC text feature from the unimodal text encoder's ``cls`` token (BLIP) or the ``mean`` of its
    token states over the text ([CLS] and [SEP] included, padding not). From scratch in a few hundred
    steps, ``mean`` gives the contrastive loss every word at once instead of what attention has learnt
    to gather into [CLS] (capfilt/recipes/demo.yaml)."""
    vision_stem: list[int] = field(default_factory=list)
    """Channels of a convolutional stem in place of the ViT's linear patch embedding: per entry one
    3x3 stride-2 convolution + BatchNorm + ReLU, then a 1x1 convolution to ``vision_width``, so
    ``patch_size`` must be 2 ** len(vision_stem). Empty (default): BLIP's patch embedding. From
    scratch on small images a linear patch embedding learns colour and position but not shape for
    hundreds of steps; a stem sees shape early (Xiao et al. 2021, "Early convolutions help
    transformers see better"). Not in transformers' BLIP: such a model does not export."""
    grad_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""

    def validate(self) -> None:
        if self.vision_stem:
            check(
                all(c >= 1 for c in self.vision_stem),
                "vision_stem",
                "channels >= 1",
                self.vision_stem,
            )
            check(
                2 ** len(self.vision_stem) == self.patch_size,
                "vision_stem",
                f"one entry per halving of patch_size {self.patch_size} (patch_size = 2 ** len)",
                self.vision_stem,
            )
        for name in ("image_size", "patch_size", "vision_width", "vision_depth", "vision_heads"):
            check(getattr(self, name) >= 1, name, ">= 1", getattr(self, name))
        for name in ("text_width", "text_layers", "text_heads", "text_intermediate", "embed_dim"):
            check(getattr(self, name) >= 1, name, ">= 1", getattr(self, name))
        check(
            self.image_size % self.patch_size == 0,
            "image_size",
            f"a multiple of patch_size ({self.patch_size})",
            self.image_size,
        )
        check(
            self.vision_width % self.vision_heads == 0,
            "vision_width",
            f"divisible by vision_heads ({self.vision_heads})",
            self.vision_width,
        )
        check(
            self.text_width % self.text_heads == 0,
            "text_width",
            f"divisible by text_heads ({self.text_heads})",
            self.text_width,
        )
        check(self.max_text_len >= 3, "max_text_len", ">= 3", self.max_text_len)
        check(self.vocab_size >= 1, "vocab_size", ">= 1", self.vocab_size)
        check(0.0 <= self.drop_path < 1.0, "drop_path", "in [0, 1)", self.drop_path)
        check(0.0 <= self.text_dropout < 1.0, "text_dropout", "in [0, 1)", self.text_dropout)
        check(0.0 <= self.alpha <= 1.0, "alpha", "in [0, 1]", self.alpha)
        check(0.0 <= self.momentum <= 1.0, "momentum", "in [0, 1]", self.momentum)
        check(self.temp > 0, "temp", "> 0", self.temp)
        check(self.queue_size >= 0, "queue_size", ">= 0", self.queue_size)
        # the recipe loader checks the Literal choices; this also covers configs built in code
        check(
            self.weight_init in WEIGHT_INITS,
            "weight_init",
            " or ".join(WEIGHT_INITS),
            self.weight_init,
        )
        check(
            self.image_pool in IMAGE_POOLS, "image_pool", " or ".join(IMAGE_POOLS), self.image_pool
        )
        check(self.text_pool in TEXT_POOLS, "text_pool", " or ".join(TEXT_POOLS), self.text_pool)


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
        check(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)
        check(self.num_workers >= 0, "num_workers", ">= 0", self.num_workers)
        check(self.shuffle_buffer >= 1, "shuffle_buffer", ">= 1", self.shuffle_buffer)
        check(self.max_words >= 1, "max_words", ">= 1", self.max_words)
        for i, weight in enumerate(self.weights):
            check(weight >= 0, f"weights[{i}]", ">= 0", weight)
        if self.weights and sum(self.weights) <= 0:
            raise ConfigError("weights: must not all be zero")
        if self.weights and self.shards and len(self.weights) != len(self.shards):
            raise ConfigError("weights: needs one weight per shard source")
        lo, hi = self.crop_scale
        check(0 < lo <= hi <= 1, "crop_scale", "0 < low <= high <= 1", list(self.crop_scale))
        for i, value in enumerate(self.std):
            check(value > 0, f"std[{i}]", "> 0", value)


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
    itm_negatives: ItmNegatives = "hard"
    """How ITM draws its negative image per text and negative text per image from the global batch
    (docs/architecture.md §2, ITM): ``hard`` (BLIP: with probability softmax of the ITC similarity,
    so mostly the pairs ITC confuses), ``random`` (uniform over the batch's other images/texts) or
    ``mixed`` (even rows of the global batch hard, odd rows random). Where a caption is often true
    of many images (the demo's world), hard negatives are often true of their image too and an ITM
    trained on them alone rejects clean texts; ``random`` rarely draws such, ``mixed`` keeps half of
    BLIP's (capfilt/recipes/demo.yaml)."""
    compile: bool = False
    """Run the training step through ``torch.compile`` (inductor). Pays a compile of tens of
    seconds to minutes at start-up for faster steps on GPU; the saved weights are the same model's."""

    def validate(self) -> None:
        check(self.epochs >= 1, "epochs", ">= 1", self.epochs)
        check(self.samples_per_epoch >= 0, "samples_per_epoch", ">= 0", self.samples_per_epoch)
        check(self.lr > 0, "lr", "> 0", self.lr)
        check(self.weight_decay >= 0, "weight_decay", ">= 0", self.weight_decay)
        for i, beta in enumerate(self.betas):
            check(0 <= beta < 1, f"betas[{i}]", "in [0, 1)", beta)
        check(self.warmup_steps >= 0, "warmup_steps", ">= 0", self.warmup_steps)
        check(self.warmup_lr >= 0, "warmup_lr", ">= 0", self.warmup_lr)
        check(0 < self.lr_decay_rate <= 1, "lr_decay_rate", "in (0, 1]", self.lr_decay_rate)
        check(0 <= self.min_lr <= self.lr, "min_lr", "in [0, lr]", self.min_lr)
        check(self.grad_accum >= 1, "grad_accum", ">= 1", self.grad_accum)
        check(self.clip_grad >= 0, "clip_grad", ">= 0 (0 = off)", self.clip_grad)
        check(self.alpha_ramp_epochs >= 0, "alpha_ramp_epochs", ">= 0", self.alpha_ramp_epochs)
        check(self.log_every >= 1, "log_every", ">= 1", self.log_every)
        check(self.ckpt_every >= 1, "ckpt_every", ">= 1", self.ckpt_every)
        # 0 would delete the checkpoint just written, leaving ``latest`` naming nothing
        check(self.keep_checkpoints >= 1, "keep_checkpoints", ">= 1", self.keep_checkpoints)
        check(
            self.itm_negatives in ITM_NEGATIVES,
            "itm_negatives",
            " or ".join(ITM_NEGATIVES),
            self.itm_negatives,
        )


CaptionMethod = Literal["nucleus", "greedy", "beam"]
CAPTION_METHODS = get_args(CaptionMethod)
"""Caption decoders (``caption.method``); the demo evaluates the captioner with each."""


@dataclass
class CaptionConfig:
    """Synthetic captions (``capfilt caption``)."""

    num_captions: int = 1
    """Synthetic captions per image."""
    method: CaptionMethod = "nucleus"
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
    compile: bool = False
    """Run the decoder's steps through ``torch.compile`` (inductor): fused kernels for a step that
    is bound by kernel launches on a GPU (a BLIP-base decoder step at batch 128). Pays a compile
    (tens of seconds) in each process first; captions equal the eager decoder's up to float
    rounding, so a changed setting re-captions. Not yet measured on a GPU."""
    cuda_graphs: bool = False
    """On a GPU, capture one decoding step of nucleus or greedy sampling as a CUDA graph and replay
    it for every step: one launch instead of a few hundred small kernels per step, whose launching
    bounds a BLIP-base captioner's rate. Fixed shapes: finished rows stay in the batch until all
    are done, and attention reads every cache position under a mask; captions equal the eager
    loop's up to float rounding (a changed setting re-captions). Each batch shape pays a capture
    (a few steps) once per process; beam search and CPUs decode eagerly whatever this says. Not
    yet measured on a GPU (``benchmarks/gpu_check.sh`` measures it)."""

    def validate(self) -> None:
        check(self.num_captions >= 1, "num_captions", ">= 1", self.num_captions)
        check(0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p)
        check(self.temperature > 0, "temperature", "> 0", self.temperature)
        check(
            self.repetition_penalty > 0,
            "repetition_penalty",
            "> 0 (1 = off)",
            self.repetition_penalty,
        )
        check(self.num_beams >= 1, "num_beams", ">= 1", self.num_beams)
        check(self.min_length >= 0, "min_length", ">= 0", self.min_length)
        check(self.max_length >= 1, "max_length", ">= 1", self.max_length)
        check(
            self.min_length <= self.max_length,
            "min_length",
            f"<= max_length ({self.max_length})",
            self.min_length,
        )
        check(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)


RerankScore = Literal["blip", "log_odds", "log_prob"]
RERANK_SCORES = get_args(RerankScore)

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
    itc_cosine: bool | None = None
    """Compute each text's ITC cosine with its image (one more text-encoder pass, a fifth to a
    quarter of the scoring time at the demo's size) and record it in the parquet. None (default):
    only when the rule decides on it (``itc``, ``both``). true: also with ``rule: itm``, so that
    ``capfilt eval filter`` compares ITC with ITM and a later ``--scores-from`` run may decide on
    it. false: never (refused with ``itc`` and ``both``)."""
    batch_size: int = 64
    """Images per scoring batch; their texts are scored in order of length, this many at a time
    (each chunk padded to its own longest)."""
    num_workers: int = 0
    """DataLoader processes decoding and transforming images (0 = in the main process)."""

    @property
    def computes_cosine(self) -> bool:
        """Whether scoring computes the ITC cosine (``itc_cosine`` resolved against the rule)."""
        return self.rule != "itm" if self.itc_cosine is None else self.itc_cosine

    def validate(self) -> None:
        check(self.rule in FILTER_RULES, "rule", " or ".join(FILTER_RULES), self.rule)
        if self.rule != "itm":
            check(
                self.itc_cosine is not False,
                "itc_cosine",
                f"true or null with rule {self.rule}",
                self.itc_cosine,
            )
        # a probability: above 1 nothing is ever kept, below 0 everything is
        check(
            0 <= self.threshold <= 1, "threshold", "in [0, 1] (an ITM probability)", self.threshold
        )
        check(
            -1 <= self.itc_threshold <= 1,
            "itc_threshold",
            "in [-1, 1] (a cosine)",
            self.itc_threshold,
        )
        if self.keep_fraction is not None:
            check(
                0 < self.keep_fraction <= 1,
                "keep_fraction",
                "in (0, 1] (or null)",
                self.keep_fraction,
            )
        check(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)


@dataclass
class EvalConfig:
    """Evaluation (``capfilt eval``)."""

    k: int = 256
    """Candidates re-ranked by ITM per query (0 = ITC only)."""
    rerank_score: RerankScore = "blip"
    """Score of a re-ranked candidate. ``blip``: ITM match logit + cosine (BLIP's evaluation; the
    cosine, within ±1, only breaks near-ties of a strong ITM head). ``log_odds``: ITM log-odds
    (match − no-match logit) + ITC logit (cosine / temperature): both on the scale of a log
    probability, so an ITM head weaker than ITC (the demo's, after minutes of pretraining) adds to
    the ITC ranking instead of replacing it. ``log_prob``: ITM log-probability of a match
    (log softmax(itm)[1], at most 0) + ITC logit: the log of the product of the two heads'
    probabilities; a text ITM is sure of keeps its ITC place, one it doubts moves down
    (docs/architecture.md §4)."""
    batch_size: int = 64
    """Images or texts per feature batch."""
    num_workers: int = 0
    """DataLoader processes decoding and transforming test images (0 = in the main process)."""

    def validate(self) -> None:
        check(self.k >= 0, "k", ">= 0 (0 = ITC only)", self.k)
        check(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)


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
    """Intra-op threads per process (torch.set_num_threads) in training, caption, filter and
    eval. 0 = auto: ``OMP_NUM_THREADS`` when set, else this rank's share of the cores (CPU
    affinity ÷ ranks on the node) less one core per loader process of the stage
    (``data.num_workers``, ``caption.num_workers``, ...) and one for everything else, at least 1. Small models on a
    few cores train fastest without oversubscription (benchmarks/threads.py); on an idle 2-core
    machine set 2."""

    def validate(self) -> None:
        if self.threads < 0:
            raise ConfigError("threads: must be >= 0 (0 = auto)")


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
