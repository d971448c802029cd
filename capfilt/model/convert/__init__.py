"""BLIP's released checkpoints in capfilt: import from / export to transformers' BLIP format and
import BLIP's original ``.pth`` state dicts. Which format a path holds is decided by
``capfilt.runs.resolve``; this package only maps names, configs and weights.

- ``keymaps``: parameter names (timm ViT <-> transformers' ``BlipVisionModel``, transformers and
  ``.pth`` keys -> MED keys);
- ``config_map``: ModelConfig <-> transformers' ``BlipConfig``;
- ``fill``: a seeded MED filled from MED-named tensors (the side a checkpoint lacks included) and
  the meta of an imported model;
- ``transformers_io``: load a transformers BLIP folder (or fetch a hub snapshot) as a MED, and
  write a MED as a transformers folder;
- ``blip_pth``: BLIP's original ``.pth`` files.

Two transformers classes hold the two CapFilt models:

- ``BlipForConditionalGeneration`` (a *captioner*): ``vision_model`` + ``text_decoder``;
- ``BlipForImageTextRetrieval`` (a *filter*): ``vision_model`` + ``text_encoder`` + ``vision_proj``
  + ``text_proj`` + ``itm_head``.

Mapping onto capfilt's :class:`~capfilt.model.med.MED`:

- **Vision.** transformers' ``BlipVisionModel`` and timm's ViT are the same network under other
  names (pre-norm blocks, fused ``qkv`` with the same [3, heads, head_dim] layout, [CLS] first, exact
  GELU); ``post_layernorm`` on ``last_hidden_state`` is timm's final ``norm``
  (:data:`~capfilt.model.convert.keymaps.VISION_KEYS`). BLIP trained its ViT with LayerNorm eps
  1e-6 (capfilt's ViT default); transformers' BLIP configs say ``layer_norm_eps`` = 1e-5. The
  import keeps the checkpoint's eps (recorded in the folder meta's
  ``extra.vision_layer_norm_eps`` and re-applied on load) so that outputs equal transformers';
  the export writes the eps the model runs with.
- **Text.** Both sides are transformers' ``BlipText*`` classes, so keys are equal up to the prefix.
  capfilt's encoder and decoder share everything but self-attention; a captioner checkpoint has
  only the decoder and a retrieval checkpoint only the encoder. The missing side takes the shared
  weights (the same tensors) and, for its self-attention, a copy of the present side's
  self-attention (encoder SA := decoder SA for a captioner, decoder SA := encoder SA for a filter).
  Heads the checkpoint lacks (a captioner's ``vision_proj``/``text_proj``/``itm_head``, a filter's
  LM-head transform and bias) get a new MED's initialisation from a fixed seed, alone (the model
  is built unfilled, as a model folder is loaded), and are listed in the meta's
  ``extra.imported.initialised``: they are never used by that stage.
- **Tokens.** BLIP's tokenizer is bert-base-uncased plus ``[DEC]`` (bos, 30522) and ``[ENC]``
  (30523). transformers' ``BlipForConditionalGeneration.generate`` puts ``bos_token_id`` first
  and stops at ``sep_token_id``, as capfilt does. ``BlipForImageTextRetrieval`` passes the ids as
  given ([CLS] first) to the ITM head, while BLIP trained and evaluated ITM with ``[ENC]`` first;
  capfilt always puts ``[ENC]`` first. The hub's tokenizers lack ``[ENC]``; capfilt adds it after
  ``[DEC]``, so feed transformers ``ids[:, 0] = len(tokenizer)`` (the hub tokenizer's length) for
  equal scores.
- **Preprocessing.** Images: bicubic resize to ``image_size`` and the mean/std of the
  checkpoint's ``BlipImageProcessor`` (CLIP's, its defaults, when the folder has none), recorded
  in the imported folder's ``preprocess``; an export writes the model's saved statistics into its
  ``BlipImageProcessor``. Caption prompt: ``"a picture of "``
  (capfilt's caption default, BLIP's).

Original BLIP ``.pth`` files already use capfilt's names (``visual_encoder.*`` in timm layout,
``text_encoder.*``, ``text_decoder.*``, ``*_m``, queues); only ``ptr_queue`` is renamed, the
momentum text encoder's cross-attention (unused by ITC) and BLIP's image-id queue are dropped.
"""
