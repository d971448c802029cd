"""The MED model: ViT image encoder + BERT text encoder/decoder sharing all but self-attention
(docs/architecture.md §1), with the ITC (momentum distillation + queues), ITM (hard negatives) and
LM losses of §2.

Module names follow BLIP's pretraining model (``visual_encoder``, ``text_encoder``,
``text_decoder.bert``/``text_decoder.cls``, ``vision_proj``, ``text_proj``, ``itm_head``, ``temp``,
``*_m`` momentum copies, ``image_queue``/``text_queue``/``idx_queue``/``queue_ptr``); the text stack
(:mod:`capfilt.model.text`) keeps the parameter names of transformers' ``BlipTextModel`` /
``BlipTextLMHeadModel``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from capfilt.config.schema import ModelConfig
from capfilt.model.distributed import Gather
from capfilt.model.losses import (
    LABEL_SMOOTHING,
    itc_loss,
    itc_targets,
    itm_loss,
    lm_labels,
    lm_loss,
    sample_itm_negatives,
    too_few_images,
)
from capfilt.model.text import CrossKV, TextConfig, TextLMHeadModel, TextModel, init_bert
from capfilt.model.vision import VIT_LAYER_NORM_EPS, build_vit

LOSSES = ("itc", "itm", "lm")
"""Loss names accepted by ``MED.forward_pretrain(weights=...)``."""

MAX_POSITIONS = 512
"""Text position table size (BERT's; lets a bert-base checkpoint load as is)."""

TEMP_RANGE = (0.001, 0.5)
"""Clamp range of the learnable ITC temperature (docs/architecture.md §1, heads)."""

MOMENTUM_MODULES = ("visual_encoder_m", "text_encoder_m", "vision_proj_m", "text_proj_m")
"""The momentum copies (ITC's momentum distillation): training state only."""

QUEUES = ("image_queue", "text_queue", "idx_queue", "queue_ptr")
"""The ITC queue buffers: training state only."""


def is_training_state(name: str) -> bool:
    """Whether a state-dict name is training state: of a momentum copy or a queue."""
    return name in QUEUES or name.split(".", 1)[0] in MOMENTUM_MODULES


def tensor_names(module: nn.Module) -> list[tuple[torch.Tensor, list[str]]]:
    """Each parameter and buffer of ``module`` once, with every name it has (a tied tensor has
    several), in module order: parents first, so a tensor's last name is its innermost holder's.
    By identity, not storage: it works on the meta device, where nothing has storage yet."""
    found: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for module_name, sub in module.named_modules(remove_duplicate=False):
        own = [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]
        for attr, tensor in own:
            found.setdefault(id(tensor), (tensor, []))[1].append(
                f"{module_name}.{attr}".lstrip(".")
            )
    return list(found.values())


SHARED_LAYER_PARTS = ("crossattention", "intermediate", "output")
"""Per-layer submodules the decoder takes from the encoder; only ``attention`` (self-attention) is its own."""


def text_config(
    cfg: ModelConfig, vocab_size: int, special: dict[str, int], cross_attention: bool
) -> TextConfig:
    """Dimensions of the text stack (``cross_attention``: whether layers have cross-attention)."""
    if cfg.max_text_len > MAX_POSITIONS:
        raise ValueError(f"model.max_text_len: at most {MAX_POSITIONS}")
    return TextConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.text_width,
        encoder_hidden_size=cfg.vision_width,
        intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=MAX_POSITIONS,
        hidden_dropout_prob=cfg.text_dropout,
        attention_probs_dropout_prob=cfg.text_dropout,
        layer_norm_eps=1e-12,
        pad_token_id=special["pad"],
        cross_attention=cross_attention,
    )


def fp32_head(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``head(x)`` in float32, also under bf16 autocast. The filter reads ITM probabilities and ITC
    cosines against thresholds (0.5) and users re-threshold them finely: from a bf16 head they
    come in steps of 1/128 or coarser, and a tiny model's two ITM logits round to the same value
    (every score exactly 0.5). A head is a few thousand FLOPs per sample."""
    with torch.autocast(x.device.type, enabled=False):
        return head(x.float())


def check_image_ids(image_ids: torch.Tensor, *, distinct: bool = False) -> None:
    """``ValueError`` for a negative image id (-1 marks empty queue slots), and with ``distinct``
    for a batch of fewer than 2 images (ITM needs a negative for every sample)."""
    if bool((image_ids < 0).any()):
        raise ValueError("image_ids must be >= 0 (-1 marks empty queue slots)")
    if distinct and image_ids.unique().numel() < 2:
        raise too_few_images(image_ids.numel(), int(image_ids.unique().numel()))


class MED(nn.Module):
    """Multimodal mixture of Encoder-Decoder (BLIP).

    Training-loop contract, per optimiser step: ``clamp_temp()`` before the forward pass,
    ``loss = model(images, ids, mask, ...)["loss"]`` (``forward`` is ``forward_pretrain``, so DDP
    wrapping works), backward, optimiser step, then ``momentum_update()``. The queues are filled
    inside the forward pass (training mode only).
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, special: dict[str, int]):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.special = {k: int(special[k]) for k in ("pad", "cls", "sep", "enc", "dec")}

        self.visual_encoder = build_vit(cfg, cfg.drop_path)
        tcfg = text_config(cfg, vocab_size, self.special, cross_attention=True)
        self.text_encoder = TextModel(tcfg)
        self.text_decoder = TextLMHeadModel(tcfg)
        self.tie_text_weights()

        self.vision_proj = nn.Linear(cfg.vision_width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.text_width, cfg.embed_dim)
        self.itm_head = nn.Linear(cfg.text_width, 2)
        self.temp = nn.Parameter(self._initial_temp())

        # momentum copies (ITC, docs/architecture.md §2); the text one is unimodal only, so it has no cross-attention
        self.visual_encoder_m = build_vit(cfg, 0.0)
        self.text_encoder_m = TextModel(
            text_config(cfg, vocab_size, self.special, cross_attention=False)
        )
        self.vision_proj_m = nn.Linear(cfg.vision_width, cfg.embed_dim)
        self.text_proj_m = nn.Linear(cfg.text_width, cfg.embed_dim)
        if cfg.weight_init == "fan_in":
            self.init_fan_in()
        self.copy_params()

        self.register_buffer("image_queue", torch.empty(cfg.embed_dim, cfg.queue_size))
        self.register_buffer("text_queue", torch.empty(cfg.embed_dim, cfg.queue_size))
        self.register_buffer("idx_queue", torch.empty((1, cfg.queue_size), dtype=torch.long))
        self.register_buffer("queue_ptr", torch.empty(1, dtype=torch.long))
        self.reset_queues()

        if cfg.grad_checkpointing:
            self.set_grad_checkpointing(True)

    @torch.no_grad()
    def reset_queues(self) -> None:
        """The ITC queues as a new model has them: random unit features, no image ids (-1: real
        ids are >= 0, so these entries are never positives), written from position 0."""
        self.image_queue.copy_(F.normalize(torch.randn_like(self.image_queue), dim=0))
        self.text_queue.copy_(F.normalize(torch.randn_like(self.text_queue), dim=0))
        self.idx_queue.fill_(-1)
        self.queue_ptr.zero_()

    def drop_training_state(self) -> None:
        """Free what only training uses, the momentum copies and the ITC queues, from a model that
        will only infer (a stage's: caption, filter, eval): at BLIP-base 0.9 of its 1.9 GB, which
        it would otherwise carry to its device. The model cannot be trained or saved afterwards
        (its state dict lacks them)."""
        for name in (*MOMENTUM_MODULES, *QUEUES):
            setattr(self, name, None)

    def _initial_temp(self) -> torch.Tensor:
        return torch.tensor(float(self.cfg.temp)).clamp(*TEMP_RANGE)

    @torch.no_grad()
    def init_parts(self, names: Iterable[str]) -> None:
        """Initialise the parameters ``names`` (state-dict names) as this constructor does, drawing
        from torch's current random state; each whole module holding one is initialised (a
        Linear's weight with its bias).

        For a model built without initial values (:func:`capfilt.model.build.build_unfilled`) of
        which a checkpoint holds all but these: the heads an imported captioner or filter lacks.
        The text stack gets BERT's init, the ITC/ITM heads a new ``nn.Linear``'s, ``temp`` the
        config's; with ``weight_init: fan_in`` the weights are then re-drawn as in
        :meth:`init_fan_in`. Raises ValueError for a part without such a rule (the ViT: timm
        initialises a ViT as a whole; the momentum copies: :meth:`copy_params` sets them) or an
        unknown name.
        """
        names = sorted(set(names))
        known = dict(self.named_parameters(remove_duplicate=False))
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"not parameters of the model: {unknown[:6]}")
        # tensor -> the innermost module holding it (the LM bias: `predictions`' `decoder`)
        holder = {id(t): names[-1].rpartition(".")[0] for t, names in tensor_names(self)}
        modules: dict[str, nn.Module] = {}
        for name in names:
            if name == "temp":
                self.temp.copy_(self._initial_temp())
                continue
            module_name = holder[id(known[name])]
            modules.setdefault(module_name, self.get_submodule(module_name))
        for module_name, module in sorted(modules.items()):
            if module_name.split(".")[0] in ("text_encoder", "text_decoder"):
                init_bert(module)
            elif module_name in ("vision_proj", "text_proj", "itm_head"):
                module.reset_parameters()
            else:
                raise ValueError(f"{module_name} has no initialisation of its own")
        if self.cfg.weight_init == "fan_in":
            self.init_fan_in(modules.values())

    # ------------------------------------------------------------------ structure
    def tie_text_weights(self) -> None:
        """Make the decoder use the encoder's embeddings, cross-attention and FFN modules (BLIP
        Table 3 weight sharing; only self-attention stays separate) and tie the LM output layer to the
        shared word embeddings."""
        enc, dec = self.text_encoder, self.text_decoder.bert
        dec.embeddings = enc.embeddings
        for layer_e, layer_d in zip(enc.encoder.layer, dec.encoder.layer, strict=True):
            for part in SHARED_LAYER_PARTS:
                setattr(layer_d, part, getattr(layer_e, part))
        self.text_decoder.cls.predictions.decoder.weight = enc.embeddings.word_embeddings.weight

    @torch.no_grad()
    def init_fan_in(self, modules: Iterable[nn.Module] | None = None) -> None:
        """Re-draw every linear and embedding weight (of ``modules``, default all) from
        N(0, 1/fan_in) (``weight_init: fan_in``); biases, norms, the patch convolution and
        position/[CLS] parameters keep their init."""
        modules = list(self.modules() if modules is None else modules)
        for module in modules:
            if isinstance(module, nn.Linear | nn.Embedding):
                module.weight.normal_(0.0, module.weight.shape[1] ** -0.5)
        # after every draw: the LM output layer shares the word embeddings' tensor
        for module in modules:
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [
            (self.visual_encoder, self.visual_encoder_m),
            (self.text_encoder, self.text_encoder_m),
            (self.vision_proj, self.vision_proj_m),
            (self.text_proj, self.text_proj_m),
        ]

    def _momentum_params(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        online, momentum = [], []
        for model, model_m in self.momentum_pairs():
            params = dict(model.named_parameters())
            for name, p_m in model_m.named_parameters():
                online.append(params[name])
                momentum.append(p_m)
        return online, momentum

    @torch.no_grad()
    def copy_params(self) -> None:
        """Set every momentum parameter to its online counterpart and freeze it."""
        for p, p_m in zip(*self._momentum_params(), strict=True):
            p_m.data.copy_(p.data)
            p_m.requires_grad_(False)

    @torch.no_grad()
    def momentum_update(self, momentum: float | None = None) -> None:
        """EMA of the online weights: ``p_m = m * p_m + (1 - m) * p`` (m = ``cfg.momentum``)."""
        m = self.cfg.momentum if momentum is None else momentum
        online, mom = self._momentum_params()
        torch._foreach_mul_(mom, m)
        torch._foreach_add_(mom, [p.detach() for p in online], alpha=1 - m)

    @torch.no_grad()
    def clamp_temp(self) -> None:
        """Clamp the ITC temperature to [0.001, 0.5]; call before each step."""
        self.temp.clamp_(*TEMP_RANGE)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute ViT blocks and text layers in backward (non-reentrant checkpointing)."""
        self.visual_encoder.set_grad_checkpointing(enable)
        for layer in (*self.text_encoder.encoder.layer, *self.text_decoder.bert.encoder.layer):
            layer.gradient_checkpointing = enable

    @torch.no_grad()
    def dequeue_and_enqueue(
        self, image_feat_m: torch.Tensor, text_feat_m: torch.Tensor, idx: torch.Tensor
    ) -> None:
        """Write the momentum features of the GLOBAL batch (already all-gathered) into the queues.

        With ``queue_size`` 0 there is no queue and this does nothing. Writes at ``queue_ptr`` and wraps around modulo ``queue_size``; a batch larger than the
        queue keeps its last ``queue_size`` rows. Stays on device (no host sync).
        """
        q = self.image_queue.shape[1]
        if q == 0:  # queue_size 0: ITC against the (global) batch only
            return
        n = image_feat_m.shape[0]
        k = min(n, q)
        ptr = self.queue_ptr[0]
        pos = (ptr + (n - k) + torch.arange(k, device=ptr.device)) % q
        self.image_queue.index_copy_(1, pos, image_feat_m[n - k :].t().to(self.image_queue.dtype))
        self.text_queue.index_copy_(1, pos, text_feat_m[n - k :].t().to(self.text_queue.dtype))
        self.idx_queue.index_copy_(1, pos, idx.view(1, -1)[:, n - k :].to(self.idx_queue.dtype))
        self.queue_ptr.copy_((ptr + n) % q)

    # ------------------------------------------------------------------ encoders
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Image tokens [B, 1 + N, vision_width], [CLS] first."""
        return self.visual_encoder.forward_features(images)

    def pool_image(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """The token summary the ITC head projects: [CLS] (BLIP) or the mean of the patch tokens."""
        if self.cfg.image_pool == "mean":
            return image_embeds[:, 1:, :].mean(1)
        return image_embeds[:, 0, :]

    def image_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Normalised ITC image features [B, embed_dim] (from :meth:`pool_image`)."""
        return F.normalize(fp32_head(self.vision_proj, self.pool_image(image_embeds)), dim=-1)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, first_only: bool = False
    ) -> torch.Tensor:
        """Unimodal text encoder (bidirectional, no cross-attention): [B, L, text_width]; ids start
        with [CLS]. ``first_only``: [B, 1, text_width], the [CLS] state alone, with the last layer's
        work for the other tokens skipped."""
        return self.text_encoder(
            input_ids=input_ids, attention_mask=attention_mask, first_only=first_only
        ).last_hidden_state

    def pool_text(self, text_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The summary the ITC head projects: [CLS] (BLIP) or the mean of the token states over the
        text's tokens (``model.text_pool``); ``text_embeds`` may be the [CLS] state alone for ``cls``."""
        if self.cfg.text_pool == "mean":
            weights = attention_mask.unsqueeze(-1).to(text_embeds.dtype)
            return (text_embeds * weights).sum(1) / weights.sum(1).clamp_min(1)
        return text_embeds[:, 0, :]

    def encode_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, momentum: bool = False
    ) -> torch.Tensor:
        """Normalised ITC text features [B, embed_dim]: the unimodal encoder, :meth:`pool_text`, the
        projection; ``momentum``: the momentum encoder and projection (ITC's targets). With the
        ``cls`` pool the last layer computes the [CLS] row alone."""
        encoder, proj = (
            (self.text_encoder_m, self.text_proj_m)
            if momentum
            else (self.text_encoder, self.text_proj)
        )
        states = encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            first_only=self.cfg.text_pool == "cls",
        ).last_hidden_state
        return F.normalize(fp32_head(proj, self.pool_text(states, attention_mask)), dim=-1)

    def _first_token(self, input_ids: torch.Tensor, token: str) -> torch.Tensor:
        ids = input_ids.clone()
        ids[:, 0] = self.special[token]
        return ids

    def image_cross_kv(self, image_embeds: torch.Tensor) -> CrossKV:
        """Cross-attention keys/values of the shared text layers for ``image_embeds``: compute them
        once per image and pass them (with ``image_index``) to score many texts against it."""
        return self.text_encoder.cross_kv(image_embeds)

    def multimodal_embeds(
        self,
        image_embeds: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cross_kv: CrossKV | None = None,
        image_index: torch.Tensor | None = None,
        first_only: bool = False,
    ) -> torch.Tensor:
        """Image-grounded text encoder states [B, L, text_width] (first token set to [ENC]);
        ``first_only``: [B, 1, text_width], the [ENC] state alone (see :meth:`encode_text`).

        The image is ``image_embeds`` (row i with text i) or ``cross_kv`` from
        :meth:`image_cross_kv`, text i using image row ``image_index[i]``."""
        return self.text_encoder(
            input_ids=self._first_token(input_ids, "enc"),
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            is_decoder=False,
            cross_kv=cross_kv,
            image_index=image_index,
            first_only=first_only,
        ).last_hidden_state

    def itm_logits(
        self,
        image_embeds: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cross_kv: CrossKV | None = None,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ITM logits [B, 2] (index 1 = match) of image i (or ``image_index[i]``) with text i."""
        states = self.multimodal_embeds(
            image_embeds, input_ids, attention_mask, cross_kv, image_index, first_only=True
        )
        return fp32_head(self.itm_head, states[:, 0, :])

    def lm_logits(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Decoder logits [B, L, vocab] (causal, cross-attending to the image; first token set to
        [DEC]); position t scores token t+1."""
        return self.text_decoder(
            input_ids=self._first_token(input_ids, "dec"),
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
        ).logits

    # ------------------------------------------------------------------ losses
    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Same as :meth:`forward_pretrain` (so that ``DistributedDataParallel(model)(...)`` works)."""
        return self.forward_pretrain(*args, **kwargs)

    def forward_pretrain(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_ids: torch.Tensor | None = None,
        alpha: float = 0.4,
        gather: Gather | None = None,
        weights: Iterable[str] = LOSSES,
        prompt_len: int = 0,
        generator: torch.Generator | None = None,
        itm_negatives: str = "hard",
    ) -> dict[str, torch.Tensor]:
        """Losses of docs/architecture.md §2 on a batch; ``loss`` is the unweighted sum of the selected ones.

        - ``input_ids``/``attention_mask``: from :func:`capfilt.model.tokenizer.tokenize` ([CLS] ... [SEP]).
        - ``image_ids``: LongTensor [B] of ids >= 0; samples sharing an id are ITC positives of each
          other (also against the queue) and never ITM negatives. None: every sample is its own image.
        - ``alpha``: momentum-distillation weight (the trainer ramps it).
        - ``gather``: a :class:`~capfilt.model.distributed.Gather`; default ``Gather()``, which is the
          identity in a single process and all-gathers over the default group under torchrun.
          Pass ``LocalGather()`` to keep every rank on its own batch.
        - ``weights``: which losses to compute: ("itc", "itm", "lm") pretraining, ("lm",) captioner,
          ("itc", "itm") filter. Losses not computed are returned as 0.
        - ``prompt_len``: leading decoder tokens ([DEC] + prompt) left out of the LM labels.
        - ``generator``: RNG of the ITM negative sampling (on the batch's device).
        - ``itm_negatives``: how ITM negatives are drawn, ``hard`` (BLIP), ``random`` or ``mixed``
          (:func:`capfilt.model.losses.sample_itm_negatives`).
        Returns ``{"loss", "loss_itc", "loss_itm", "loss_lm"}`` (0-dim tensors).
        """
        want = set(weights)
        unknown = want - set(LOSSES)
        if unknown or not want:
            raise ValueError(f"weights: choose among {LOSSES}, got {sorted(weights)}")
        gather = Gather() if gather is None else gather

        image_embeds = self.encode_image(images)
        zero = image_embeds.new_zeros((), dtype=torch.float32)
        out = {"loss_itc": zero, "loss_itm": zero, "loss_lm": zero}

        if want & {"itc", "itm"}:
            out.update(
                self._itc_itm(
                    images,
                    image_embeds,
                    input_ids,
                    attention_mask,
                    image_ids,
                    alpha,
                    gather,
                    want,
                    generator,
                    itm_negatives,
                )
            )
        if "lm" in want:
            dec_ids = self._first_token(input_ids, "dec")
            labels = lm_labels(dec_ids, attention_mask, prompt_len)
            logits = self.lm_logits(image_embeds, input_ids, attention_mask)
            out["loss_lm"] = lm_loss(logits, labels, LABEL_SMOOTHING)
        out["loss"] = sum(out[f"loss_{name}"] for name in LOSSES if name in want)
        return out

    def _itc_itm(
        self,
        images,
        image_embeds,
        input_ids,
        attention_mask,
        image_ids,
        alpha,
        gather,
        want,
        generator,
        itm_negatives="hard",
    ):
        out = {}
        b = images.shape[0]
        image_feat = self.image_features(image_embeds)
        text_feat = self.encode_text_features(input_ids, attention_mask)

        with torch.no_grad():
            if image_ids is None:
                # each sample its own image: its position in the global batch is its id
                ids_local = torch.arange(b, device=images.device) + gather.rank * b
            else:
                if image_ids.numel() != b:
                    raise ValueError(f"image_ids: expected {b} ids, got {image_ids.numel()}")
                # checked where they are: ids on the host (the trainer's) cost no device sync;
                # under torch.compile a data check would split the graph (the trainer checks
                # its ids on the host then: check_image_ids)
                if not torch.compiler.is_compiling():
                    check_image_ids(image_ids)
                ids_local = image_ids.to(
                    device=images.device, dtype=torch.long, non_blocking=True
                ).view(-1)
            ids_glob = gather.no_grad(ids_local)

            image_embeds_m = self.visual_encoder_m.forward_features(images)
            image_feat_m = F.normalize(
                fp32_head(self.vision_proj_m, self.pool_image(image_embeds_m)), dim=-1
            )
            text_feat_m = self.encode_text_features(input_ids, attention_mask, momentum=True)
            image_feat_m_glob = gather.no_grad(image_feat_m)
            text_feat_m_glob = gather.no_grad(text_feat_m)

        if "itc" in want:
            with torch.no_grad():
                image_feat_m_all = torch.cat(
                    [image_feat_m_glob.float(), self.image_queue.t().float()], 0
                )
                text_feat_m_all = torch.cat(
                    [text_feat_m_glob.float(), self.text_queue.t().float()], 0
                )
                queue_ids = (
                    self.idx_queue.view(-1)
                    if image_ids is not None
                    else torch.full_like(self.idx_queue.view(-1), -1)
                )
                sim_targets = itc_targets(ids_local, torch.cat([ids_glob, queue_ids]))
            out["loss_itc"] = itc_loss(
                image_feat,
                text_feat,
                image_feat_m_all,
                text_feat_m_all,
                self.temp,
                alpha,
                sim_targets,
                image_feat_m=image_feat_m,
                text_feat_m=text_feat_m,
            )
            if self.training:
                enqueue_ids = ids_glob if image_ids is not None else torch.full_like(ids_glob, -1)
                self.dequeue_and_enqueue(image_feat_m_glob, text_feat_m_glob, enqueue_ids)

        if "itm" in want:
            with torch.no_grad():
                # negatives over the global batch, scored against its momentum features (BLIP).
                # Every rank draws for the whole global batch and keeps its own rows: with the same
                # generator state the negatives do not depend on the number of ranks.
                image_feat_glob = gather.no_grad(image_feat).float()
                text_feat_glob = gather.no_grad(text_feat).float()
                sim_i2t = image_feat_glob @ text_feat_m_glob.float().t() / self.temp
                sim_t2i = text_feat_glob @ image_feat_m_glob.float().t() / self.temp
                # every row has another image when this batch alone holds two: no need for the
                # device-side check (a host sync) then
                # (not checked under torch.compile, where it would split the graph: the trainer
                # checks a single process's batch on the host then)
                distinct = (
                    b >= 2
                    if image_ids is None
                    else torch.compiler.is_compiling()
                    or (image_ids.device.type == "cpu" and image_ids.unique().numel() >= 2)
                )
                neg_image_all, neg_text_all = sample_itm_negatives(
                    sim_i2t,
                    sim_t2i,
                    ids_glob,
                    generator=generator,
                    mode=itm_negatives,
                    known_distinct=distinct,
                )
                offset = gather.rank * b
                neg_image_idx = neg_image_all[offset : offset + b]
                neg_text_idx = neg_text_all[offset : offset + b]
                ids_pad, ids_glob_tok = gather.no_grad_padded(input_ids, value=self.special["pad"])
                mask_pad, mask_glob = gather.no_grad_padded(
                    attention_mask, value=0, length=ids_pad.shape[1]
                )
            image_embeds_glob = gather.with_grad(image_embeds)
            text_ids = torch.cat([ids_pad, ids_pad, ids_glob_tok[neg_text_idx]], 0)
            text_mask = torch.cat([mask_pad, mask_pad, mask_glob[neg_text_idx]], 0)
            images_all = torch.cat(
                [image_embeds, image_embeds_glob[neg_image_idx], image_embeds], 0
            )
            logits = self.itm_logits(images_all, text_ids, text_mask)
            out["loss_itm"] = itm_loss(logits[:b], logits[b:])
        return out


def vision_layer_norm_eps(model: MED) -> float:
    """The LayerNorm eps the ViT runs with."""
    for module in model.visual_encoder.modules():
        if isinstance(module, nn.LayerNorm):
            return float(module.eps)
    return VIT_LAYER_NORM_EPS


def set_vision_layer_norm_eps(model: MED, eps: float) -> None:
    """Set the eps of every LayerNorm of the ViT and its momentum copy (an imported checkpoint
    may have been trained with another eps than :data:`VIT_LAYER_NORM_EPS`)."""
    for vit in (model.visual_encoder, model.visual_encoder_m):
        for module in vit.modules():
            if isinstance(module, nn.LayerNorm):
                module.eps = float(eps)


def count_parameters(model: MED) -> dict[str, int]:
    """Unique parameters: trainable, momentum (frozen copies) and total."""
    params = list(model.parameters())  # shared tensors counted once
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    return {"trainable": trainable, "momentum": total - trainable, "total": total}
