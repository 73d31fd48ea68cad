"""Options of the strategies: one dataclass per strategy that takes options (config section ``name:``).

Kept apart from the strategies (which need torch) so that the CLI can print and check them
without loading a model, as PEFT keeps a method's config apart from its layers. Every field
carries its help text (``fscl ls strategies -v``); values are checked once, in ``__post_init__``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from benchmark.config import check
from benchmark.vlm.recipe import VLMRecipe


def _check_skip(options: LoRAOptions | LoRSUOptions) -> None:
    """``skip_last_blocks``: an integer >= 0, or null in a VLM-loss strategy's options (the VLM's default)."""
    value, vlm = options.skip_last_blocks, isinstance(options, VLMRecipe)
    check((isinstance(value, int) and value >= 0) or (vlm and value is None), f"{options.section}.skip_last_blocks",
          value, "an integer >= 0 (and below the number of blocks)" + (", or null for the VLM's" if vlm else ""))


def _check_counts(options: object, *keys: str, allowed: str = "an integer >= 1") -> None:
    """Each of ``keys`` (checked in this order) of ``options``: an integer >= 1; ``allowed``: the message, where it
    says more (an upper bound the options cannot check)."""
    for key in keys:
        value = getattr(options, key)
        check(isinstance(value, int) and value >= 1, f"{options.section}.{key}", value, allowed)


def skip_blocks(options: LoRAOptions | LoRSUOptions) -> int:
    """``skip_last_blocks`` as the strategy uses it: :class:`~benchmark.config.ConfigError` for a null one, which a
    run resolves from its VLM (:func:`~benchmark.vlm.recipe.with_vlm_defaults`) before building the strategy."""
    value = options.skip_last_blocks
    check(value is not None, f"{options.section}.skip_last_blocks", value,
          "an integer; null (the VLM's) is resolved by benchmark.vlm.recipe.with_vlm_defaults(options, vqa_model) "
          "before the strategy is built")
    return value


@dataclass
class EWCOptions:
    """Options of ``ewc``."""

    ewc_lambda: float = field(default=1000.0, metadata={"help": "weight of the EWC penalty"})

    def __post_init__(self) -> None:
        check(self.ewc_lambda >= 0, "ewc.ewc_lambda", self.ewc_lambda, "a float >= 0")


@dataclass
class DistillationOptions:
    """Options of a distillation toward a frozen teacher (``lwf``, ``zscl``): ZSCL's loss, its defaults."""

    section: ClassVar[str]  # the config section, in error messages: each subclass's

    temperature: float = field(default=2.0, metadata={
        "help": "temperature T of the distillation KL(softmax(t/T) || softmax(s/T)) * T^2 (ZSCL's --T)"})
    weight: float = field(default=1.0, metadata={"help": "weight of the distillation terms in the loss"})
    text_loss: bool = field(default=True, metadata={
        "help": "also distil the transposed (text-to-image) logits (ZSCL's --text_loss)"})

    def __post_init__(self) -> None:
        check(self.temperature > 0, f"{self.section}.temperature", self.temperature, "a float > 0")
        check(self.weight >= 0, f"{self.section}.weight", self.weight, "a float >= 0")


@dataclass
class LwFOptions(DistillationOptions):
    """Options of ``lwf`` (defaults: ZSCL's ``lwf.sh``)."""

    section: ClassVar[str] = "lwf"


@dataclass
class WiSEFTOptions:
    """Options of ``wise-ft``."""

    alpha: float = field(default=0.8, metadata={
        "help": "after each session the encoder becomes alpha * fine-tuned + (1 - alpha) * anchor "
                "(ZSCL's --wise_ft_alpha 0.8); 1: plain fine-tuning, 0: the anchor"})
    anchor: Literal["pretrained", "previous"] = field(default="pretrained", metadata={
        "help": "pretrained: the pretrained encoder (WiSE-FT); previous: the encoder at the session's start "
                "(ZSCL's WiSE_finetune.sh, --wise_ft_model n)"})

    def __post_init__(self) -> None:
        check(isinstance(self.alpha, (int, float)) and 0 <= self.alpha <= 1, "wise-ft.alpha", self.alpha,
              "a float in [0, 1]")


@dataclass
class ZSCLOptions(DistillationOptions):
    """Options of ``zscl`` (defaults: ZSCL's ``ZSCL.sh``)."""

    section: ClassVar[str] = "zscl"

    reference: Literal["files", "mini"] = field(default="files", metadata={
        "help": "files: reference_images and reference_captions; mini: the mini world's clean renders and their "
                "captions (no files)"})
    reference_images: str | None = field(default=None, metadata={
        "help": "a folder of reference images, read recursively, sorted by path (ZSCL: ImageNet's training images)"})
    reference_captions: str | None = field(default=None, metadata={
        "help": "a text file of reference captions, one per line (ZSCL: Conceptual Captions)"})
    reference_batch: int = field(default=64, metadata={
        "help": "reference images drawn per training step (ZSCL's --batch-size of its reference loader)"})
    avg_freq: int | None = field(default=100, metadata={
        "help": "weight ensemble: fold the weights into their running mean after every avg_freq-th step from the "
                "first, the mean being the session's result (ZSCL's --we --avg_freq 100); null: no ensemble"})
    l2: float = field(default=1.0, metadata={
        "help": "weight of the sum of squared differences to the encoder at the session's start (ZSCL's --l2 1)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        files = (self.reference_images, self.reference_captions)
        if self.reference == "mini":
            check(files == (None, None), "zscl.reference", self.reference,
                  "files when zscl.reference_images or zscl.reference_captions is set")
        else:
            allowed = "{}, or zscl.reference=mini (the mini world's renders and captions)"
            check(self.reference_images is not None and Path(self.reference_images).is_dir(),
                  "zscl.reference_images", self.reference_images, allowed.format("a folder of reference images"))
            check(self.reference_captions is not None and Path(self.reference_captions).is_file(),
                  "zscl.reference_captions", self.reference_captions,
                  allowed.format("a text file of reference captions, one per line"))
        _check_counts(self, "reference_batch")
        check(self.avg_freq is None or (isinstance(self.avg_freq, int) and self.avg_freq >= 1), "zscl.avg_freq",
              self.avg_freq, "an integer >= 1, or null (no weight ensemble)")
        check(self.l2 >= 0, "zscl.l2", self.l2, "a float >= 0")


@dataclass
class ReplayOptions:
    """Options of ``replay``."""

    section: ClassVar[str] = "replay"  # the config section, in error messages

    buffer_size: int = field(default=200, metadata={
        "help": "samples kept from earlier sessions, split evenly over them (Avalanche's ExperienceBalancedBuffer; "
                "its ReplayPlugin's mem_size 200)"})

    def __post_init__(self) -> None:
        _check_counts(self, "buffer_size")


@dataclass
class LoRAOptions:
    """Options of ``lora`` (defaults: the released implementation's LoRA baseline)."""

    section: ClassVar[str] = "lora"  # the config section, in error messages

    rank: int = field(default=64, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=64.0, metadata={"help": "the update is (alpha / rank) · B · A"})
    proj_lora: bool = field(default=True, metadata={"help": "also adapt the final image projection"})
    init: Literal["released", "peft"] = field(default="released", metadata={
        "help": "released: output-side factor B ~ U(±1/√r), input-side A = 0 (the released code); "
                "peft: A ~ U(±1/√in), B = 0 (peft's default, a larger first update)"})
    across_sessions: Literal["keep", "merge"] = field(default="keep", metadata={
        "help": "keep: one adapter trains through all sessions (the released code); "
                "merge: merge it after each session and start the next from new factors"})
    skip_last_blocks: int = field(default=0, metadata={
        "help": "no adapter in the last N blocks"})

    def __post_init__(self) -> None:
        _check_counts(self, "rank")
        check(self.alpha > 0, f"{self.section}.alpha", self.alpha, "a float > 0")
        _check_skip(self)


@dataclass
class LoRSUOptions:
    """Options of ``lorsu`` (defaults: the released implementation's choices, docs/fidelity.md)."""

    section: ClassVar[str] = "lorsu"  # the config section, in error messages

    top_k_heads: int = field(default=2, metadata={
        "help": "attention heads updated per block (at most the backbone's heads per block)"})
    sparsity: float = field(default=0.1, metadata={"help": "fraction of each fc1 weight that trains"})
    rank: int = field(default=64, metadata={"help": "rank r of the heads' q/k/v update and of the projection LoRA"})
    alpha: float = field(default=64.0, metadata={"help": "the update is (alpha / rank) · A · B"})
    head_selection: Literal["importance", "random"] = field(default="importance", metadata={
        "help": "importance: per block the heads of largest ‖I_q,h‖² + ‖I_k,h‖² + ‖I_v,h‖²; random: a random choice"})
    fc1_mask: Literal["importance", "random", "none"] = field(default="importance", metadata={
        "help": "fc1 entries that train: those of largest |importance|, random ones, or none (fc1 weight frozen)"})
    train_attn_bias: bool = field(default=True, metadata={"help": "train the q/k/v biases of all heads (dense)"})
    train_fc1_bias: bool = field(default=True, metadata={"help": "train the fc1 biases (dense)"})
    proj_lora: bool = field(default=True, metadata={
        "help": "an unmasked rank-`rank` LoRA on the final image projection (off by itself when there is none)"})
    importance_samples: int = field(default=1000, metadata={
        "help": "score the importance on at least this many training samples (or one pass)"})
    importance_min_abs: float = field(default=1e-10, metadata={
        "help": "and until every accumulated |Σ n_b ∇L_b| is >= this (the released rule); 0: the sample count only"})
    importance_sum: Literal["batch", "running"] = field(default="batch", metadata={
        "help": "batch: Σ_b n_b ∇L_b / N; running: the released LoRSU-Ppl code's, which never zeroes .grad while "
                "scoring, so batch b adds n_b times the sum of the gradients of batches 1..b"})
    qkv_update: Literal["joint", "separate"] = field(default="joint", metadata={
        "help": "joint: one rank-r update of the chosen heads' stacked q/k/v rows, A [rows, r] Kaiming, B zero (the "
                "released CLIP path); separate: one rank-r update for each of q, k and v (the released LoRSU-Ppl), "
                "its input-side factor [r, W] Kaiming and its output-side factor zero"})
    skip_last_blocks: int = field(default=0, metadata={
        "help": "leave the last N blocks untouched (not scored, not trained)"})

    def __post_init__(self) -> None:
        _check_counts(self, "top_k_heads", allowed="an integer >= 1 (and at most the number of heads per block)")
        _check_skip(self)
        check(0 < self.sparsity <= 1, f"{self.section}.sparsity", self.sparsity, "a float in (0, 1]")
        _check_counts(self, "rank")
        check(self.alpha > 0, f"{self.section}.alpha", self.alpha, "a float > 0")
        check(self.importance_samples >= 1, f"{self.section}.importance_samples", self.importance_samples, "an integer >= 1")
        check(self.importance_min_abs >= 0, f"{self.section}.importance_min_abs", self.importance_min_abs, "a float >= 0")


@dataclass
class SPUOptions:
    """Options of ``spu`` (defaults: SPU's code)."""

    sparsity: float = field(default=0.1, metadata={
        "help": "fraction of each fc1 weight that trains: its entries of largest |score|, per block"})
    importance: Literal["output_norm", "clip_loss"] = field(default="output_norm", metadata={
        "help": "scoring objective: the mean squared norm of the image-text logits (SPU) or the CLIP loss (LoRSU)"})
    importance_fraction: float = field(default=0.25, metadata={
        "help": "fraction f of the session's T training batches to score (SPU's score_batch_percentage)"})
    importance_stop: Literal["released", "ceil"] = field(default="released", metadata={
        "help": "released: score until the 0-based batch index exceeds f*T (floor(f*T) + 2 batches) and every "
                "accumulated |score| is >= 1e-12, at most one pass (SPU's code); ceil: exactly ceil(f*T) batches"})
    importance_sum: Literal["running", "batch"] = field(default="running", metadata={
        "help": "running: add the running gradient sum after every batch, so batch j of K weighs K - j + 1 "
                "(SPU's code never zeroes .grad while scoring); batch: the plain sum of the batch gradients"})
    train_biases: Literal["fc1", "all"] = field(default="fc1", metadata={
        "help": "biases that train densely: fc1's (SPU's code: only the c_fc layers train, their biases fully) "
                "or every bias of the vision encoder"})

    def __post_init__(self) -> None:
        check(0 < self.sparsity <= 1, "spu.sparsity", self.sparsity, "a float in (0, 1]")
        check(0 < self.importance_fraction <= 1, "spu.importance_fraction", self.importance_fraction,
              "a float in (0, 1]")


@dataclass
class LoRSUPplOptions(VLMRecipe, LoRSUOptions):
    """Options of ``lorsu-ppl``: LoRSU's with the released LoRSU-Ppl defaults (separate q/k/v updates, the last
    block skipped, no attention bias, no projection LoRA) and the VLM recipe (:class:`~benchmark.vlm.recipe.VLMRecipe`:
    the optimizer settings, and the blocks the VLM never reads left alone)."""

    section: ClassVar[str] = "lorsu-ppl"

    train_attn_bias: bool = field(default=False, metadata={"help": "train the q/k/v biases of all heads (dense)"})
    proj_lora: bool = field(default=False, metadata={
        "help": "a LoRA on the final image projection (LLaVA never reads it; off)"})
    qkv_update: Literal["joint", "separate"] = field(default="separate", metadata=LoRSUOptions.__dataclass_fields__[
        "qkv_update"].metadata)

    def __post_init__(self) -> None:
        LoRSUOptions.__post_init__(self)
        self._check_recipe()


@dataclass
class LoRAPplOptions(VLMRecipe, LoRAOptions):
    """Options of ``lora-ppl``: LoRA's with the released LoRSU-Ppl code's peft LoRA (peft's init, layers 0..L-2, no
    projection) and the VLM recipe (:class:`~benchmark.vlm.recipe.VLMRecipe`)."""

    section: ClassVar[str] = "lora-ppl"

    init: Literal["released", "peft"] = field(default="peft", metadata=LoRAOptions.__dataclass_fields__[
        "init"].metadata)
    proj_lora: bool = field(default=False, metadata={
        "help": "also adapt the final image projection (LLaVA never reads it; off)"})

    def __post_init__(self) -> None:
        LoRAOptions.__post_init__(self)
        self._check_recipe()


@dataclass
class LLMLoRAOptions(VLMRecipe):
    """Options of ``lora-llm`` (the released ``lora_llm``: peft LoRA r = α = 8 on the language model) and the VLM
    recipe (:class:`~benchmark.vlm.recipe.VLMRecipe`)."""

    section: ClassVar[str] = "lora-llm"

    rank: int = field(default=8, metadata={"help": "LoRA rank r (the released --lora_rank)"})
    alpha: float = field(default=8.0, metadata={"help": "the update is (alpha / rank) · B · A (the released --lora_alpha)"})
    projector_lr: float | None = field(default=None, metadata={
        "help": "null: the projector stays frozen; a learning rate: LoRA r 64, alpha 32 on the projector's linears, "
                "trained at this rate under the same schedule (the released --mm_projector_lr)"})

    def __post_init__(self) -> None:
        _check_counts(self, "rank")
        check(self.alpha > 0, f"{self.section}.alpha", self.alpha, "a float > 0")
        check(self.projector_lr is None or self.projector_lr > 0, f"{self.section}.projector_lr", self.projector_lr,
              "null, or a learning rate > 0")
        self._check_recipe()


@dataclass
class LLMLastLoRAOptions(LLMLoRAOptions):
    """Options of ``lora-llm-last`` (the released ``lora_lastlayers``): ``lora-llm``'s on the last layers only."""

    section: ClassVar[str] = "lora-llm-last"

    last_layers: int = field(default=16, metadata={
        "help": "adapt the last N language-model layers (the released train_last_k_layers=16 on a 32-layer model: "
                "the last 16; the released code reads it as a start index)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_counts(self, "last_layers", allowed="an integer >= 1 (and at most the VLM's language-model layers)")


@dataclass
class LoRAVLMOptions(LoRAPplOptions):
    """Options of ``lora-vlm`` (the released ``full_lora``: peft LoRA r = α = 8 on the encoder, the projector, the
    language model and the head)."""

    section: ClassVar[str] = "lora-vlm"

    rank: int = field(default=8, metadata={"help": "LoRA rank r of every adapter (the released --lora_rank)"})
    alpha: float = field(default=8.0, metadata={"help": "the update is (alpha / rank) · B · A (the released --lora_alpha)"})


@dataclass
class LoRSULLMOptions(VLMRecipe):
    """Options of ``lorsu-llm`` (the released ``lorsu_llm`` as meant: LoRSU on the last language-model layers;
    defaults: the released ``TrainingArguments``', the only setting it gives that method) and the VLM recipe
    (:class:`~benchmark.vlm.recipe.VLMRecipe`)."""

    section: ClassVar[str] = "lorsu-llm"

    last_layers: int = field(default=16, metadata={
        "help": "update the last N language-model layers (the released train_last_k_layers=16)"})
    top_k_heads: int = field(default=8, metadata={
        "help": "attention heads updated per layer (the released --top_k_heads; at most the layer's heads)"})
    sparsity: float = field(default=0.01, metadata={
        "help": "fraction of each up_proj weight that trains, by |importance| (the released --sparsity)"})
    rank: int = field(default=8, metadata={
        "help": "rank r of each of the chosen heads' q, k and v updates (the released --lorsu_rank)"})
    alpha: float = field(default=8.0, metadata={
        "help": "each update is (alpha / rank) · U · D (the released --lorsu_alpha)"})
    importance_samples: int = field(default=1000, metadata={
        "help": "score the importance on at least this many training samples, or one pass (the released "
                "--grad_total_points_mask)"})
    importance_min_abs: float = field(default=1e-10, metadata=LoRSUOptions.__dataclass_fields__[
        "importance_min_abs"].metadata)
    importance_sum: Literal["batch", "running"] = field(default="batch", metadata=LoRSUOptions.__dataclass_fields__[
        "importance_sum"].metadata)

    projector_lr: float | None = field(default=None, metadata=LLMLoRAOptions.__dataclass_fields__[
        "projector_lr"].metadata)

    def __post_init__(self) -> None:
        _check_counts(self, "last_layers", "top_k_heads", "rank", "importance_samples")
        check(0 < self.sparsity <= 1, f"{self.section}.sparsity", self.sparsity, "a float in (0, 1]")
        check(self.alpha > 0, f"{self.section}.alpha", self.alpha, "a float > 0")
        check(self.importance_min_abs >= 0, f"{self.section}.importance_min_abs", self.importance_min_abs,
              "a float >= 0")
        check(self.projector_lr is None or self.projector_lr > 0, f"{self.section}.projector_lr", self.projector_lr,
              "null, or a learning rate > 0")
        self._check_recipe()


@dataclass
class MoEAdaptersOptions:
    """Options of ``moe-adapters`` (MoE-Adapters4CL, Yu et al., CVPR 2024; defaults: its released MTIL scripts,
    except the autoencoder's code width and the DDAS threshold, which the released code sets for AlexNet
    features: docs/fidelity.md)."""

    section: ClassVar[str] = "moe-adapters"

    experts: int = field(default=22, metadata={
        "help": "adapter experts in every vision block, shared by all sessions (the released --experts_num 22)"})
    top_k: int = field(default=2, metadata={
        "help": "experts each image is routed to in every block (the released --topk 2; at most experts)"})
    adapter_width: int = field(default=64, metadata={
        "help": "bottleneck width of each expert: down W→width, ReLU, up width→W (the released --ffn_num 64)"})
    adapter_scale: float = field(default=0.1, metadata={
        "help": "each expert's output is multiplied by this (the released adapter_scalar 0.1)"})
    adapter_dropout: float = field(default=0.1, metadata={
        "help": "dropout inside each expert while training (the released 0.1)"})
    freeze_per_session: int = field(default=2, metadata={
        "help": "activate-freeze: after a session, per block, its N most often chosen experts are frozen for the "
                "sessions after it (the released 2; at most experts)"})
    autoencoder_code: int = field(default=16, metadata={
        "help": "code width of each session's DDAS autoencoder on the frozen encoder's D-dim embedding (below D; "
                "the released 100 is for 43,264 AlexNet features)"})
    autoencoder_steps: int = field(default=300, metadata={
        "help": "Adam steps (batches of 64, lr 3e-3, weight decay 1e-4: the released) that train a session's "
                "autoencoder after the session"})
    ddas_threshold: float | None = field(default=None, metadata={
        "help": "an image whose reconstruction error (MSE) is above the threshold of every seen session goes "
                "through the frozen zero-shot encoder; a float: one threshold for all sessions (the released "
                "0.0585 is for AlexNet features); null: per session, ddas_margin × the largest error of its own "
                "training images"})
    ddas_margin: float = field(default=2.0, metadata={
        "help": "with ddas_threshold null: a session's threshold as a multiple of its training images' largest "
                "reconstruction error"})

    def __post_init__(self) -> None:
        _check_counts(self, "experts", "top_k", "adapter_width", "freeze_per_session", "autoencoder_code",
                      "autoencoder_steps")
        check(self.top_k <= self.experts, f"{self.section}.top_k", self.top_k,
              f"an integer in [1, experts={self.experts}]")
        check(self.freeze_per_session <= self.experts, f"{self.section}.freeze_per_session",
              self.freeze_per_session, f"an integer in [1, experts={self.experts}]")
        check(self.adapter_scale > 0, f"{self.section}.adapter_scale", self.adapter_scale, "a float > 0")
        check(0 <= self.adapter_dropout < 1, f"{self.section}.adapter_dropout", self.adapter_dropout,
              "a float in [0, 1)")
        check(self.ddas_threshold is None or self.ddas_threshold > 0, f"{self.section}.ddas_threshold",
              self.ddas_threshold, "null, or a float > 0")
        check(self.ddas_margin > 0, f"{self.section}.ddas_margin", self.ddas_margin, "a float > 0")
