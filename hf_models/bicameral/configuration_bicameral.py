"""Configuration of the Bicameral FFT byte language model (seed 000).

A Bicameral LM reads and predicts UTF-8 bytes. Each block mixes positions along two paths: a long causal
convolution evaluated with FFTs (the "frequency path", whose spectrum can be low-passed by a curriculum cutoff) and
a short depthwise convolution (the "time path"); an optional second head predicts, at every byte, the id of the BPE
token of a teacher tokenizer that covers that byte (the "dual head"). See `modeling_bicameral.py` for the math.
"""

from __future__ import annotations

from typing import Any

from ..configuration_zoo_common import ZooConfig, check_bool, check_choice, check_interval, check_positive

CONTEXT_POOLINGS = ("causal", "global")
SPECTRAL_GATINGS = ("kernel", "signal")
CONV_IMPLEMENTATIONS = ("auto", "fft", "dense")


def next_power_of_two(value: int) -> int:
    """The smallest power of two `>= value` (`value >= 1`)."""
    return 1 << max(0, int(value) - 1).bit_length()


class BicameralConfig(ZooConfig):
    r"""Configuration of a [`BicameralModel`] / [`BicameralForCausalLM`].

    The frequency grid: gates and the cutoff are defined on the bins of a real FFT of `fft_size =
    next_power_of_two(max_position_embeddings + kernel_len - 1)` points (`num_freq_bins = fft_size // 2 + 1`), the
    size the original used for its longest window (1025 bins for 1024 bytes and 128 taps, so the seed's cutoffs 128
    and 512 mean the same here).

    Args:
        vocab_size (`int`, *optional*, defaults to 259): the 256 byte values and the byte tokenizer's special tokens
            (end-of-text 256, padding 257, mask 258).
        hidden_size (`int`, *optional*, defaults to 512): channels of the residual stream (the seed's `d_model`).
        num_hidden_layers (`int`, *optional*, defaults to 6): number of bicameral blocks.
        max_position_embeddings (`int`, *optional*, defaults to 1024): the training window in bytes; it sizes the
            frequency grid. There are no position embeddings: causal (`kernel` gating) models run on longer inputs.
        kernel_len (`int`, *optional*, defaults to 128): taps of the long causal convolution (at most
            `max_position_embeddings`).
        ffn_mult (`int`, *optional*, defaults to 2): the feed-forward network is `hidden -> ffn_mult * hidden ->
            hidden` with GELU.
        time_kernel_size (`int`, *optional*, defaults to 3): width of the time path's causal depthwise convolution
            (output `t` mixes inputs `t - time_kernel_size + 1 ... t`).
        transition_bins (`int`, *optional*, defaults to 32): width of the raised-cosine roll-off of the cutoff mask,
            below the cutoff (clamped to the cutoff).
        cutoff (`int`, *optional*): frequency bins at and above `cutoff` are removed from the frequency path (the
            curriculum raises it during training, see `training.dual_head`); `None` keeps all `num_freq_bins`.
        chunk_size (`int`, *optional*, defaults to 1): the byte head at position `t` predicts byte `t + chunk_size`.
            1 is next-byte prediction (`generate`); the seed's chunk objective used 16 (`generate_chunks` emits
            `chunk_size` bytes per forward pass).
        token_vocab_size (`int`, *optional*, defaults to 50257): size of the token head (the teacher tokenizer's
            vocabulary; 50257 is GPT-2's, the seed's); 0 builds no token head.
        char_loss_weight (`float`, *optional*, defaults to 1.0): weight of the byte cross-entropy in the dual loss.
        token_loss_weight (`float`, *optional*, defaults to 0.5): weight of the token cross-entropy in the dual loss
            (0 trains exactly the single-head model).
        context_pooling (`str`, *optional*, defaults to `"causal"`): what the context gates read: `"causal"`, the
            running mean of the inputs up to each position; `"global"`, the original's mean over the whole window,
            which lets every output see future bytes (kept to document the leak; no cached generation).
        spectral_gating (`str`, *optional*, defaults to `"kernel"`): where the per-bin gates and the cutoff mask
            act: `"kernel"`, on the kernel's spectrum, truncated back to `kernel_len` causal taps; `"signal"`, the
            original's product with the signal's spectrum, a two-sided filter that leaks future bytes (kept to
            document the leak; no cached generation).
        phase_activation (`bool`, *optional*, defaults to `False`): the original's learned per-bin, per-channel
            phase rotation of the signal's spectrum (requires `spectral_gating="signal"`; it has no causal form).
        conv_impl (`str`, *optional*, defaults to `"auto"`): how a sequence is convolved with the long kernel:
            `"fft"` (zero-padded FFTs in float32), `"dense"` (a lower-triangular Toeplitz matrix product, exact and
            faster on a CPU for short sequences, O(seq²)) or `"auto"` (dense below `fft_min_length` positions).
        fft_min_length (`int`, *optional*, defaults to 1024): sequence length from which `conv_impl="auto"` uses
            FFTs (the forward + backward crossover measured on one CPU core at 256 channels and 128 taps: dense
            1.6x faster at 256 positions, 1.4x at 512, FFT 1.2x faster at 1024).
        dropout (`float`, *optional*, defaults to 0.1): dropout on each block's two residual branches and inside
            the feed-forward network.
        layer_norm_eps (`float`, *optional*, defaults to 1e-5): epsilon of the LayerNorms.
        initializer_range (`float`, *optional*, defaults to 0.02): standard deviation of the embedding and of the
            heads (the blocks keep the original's small initialisations, see `_init_weights`).
        use_cache (`bool`, *optional*, defaults to `True`): whether the model returns its state cache.
        tie_word_embeddings (`bool`, *optional*, defaults to `False`): tie the byte head's matrix to the embedding.
        pad_token_id / bos_token_id / eos_token_id (`int`, *optional*): special ids (the byte tokenizer's by
            default: padding 257, end-of-text 256).
    """

    model_type = "bicameral_lm"
    keys_to_ignore_at_inference = ["cache"]

    def __init__(
        self,
        vocab_size: int = 259,
        hidden_size: int = 512,
        num_hidden_layers: int = 6,
        max_position_embeddings: int = 1024,
        kernel_len: int = 128,
        ffn_mult: int = 2,
        time_kernel_size: int = 3,
        transition_bins: int = 32,
        cutoff: int | None = None,
        chunk_size: int = 1,
        token_vocab_size: int = 50257,
        char_loss_weight: float = 1.0,
        token_loss_weight: float = 0.5,
        context_pooling: str = "causal",
        spectral_gating: str = "kernel",
        phase_activation: bool = False,
        conv_impl: str = "auto",
        fft_min_length: int = 1024,
        dropout: float = 0.1,
        layer_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        pad_token_id: int | None = 257,
        bos_token_id: int | None = None,
        eos_token_id: int | None = 256,
        **kwargs: Any,
    ) -> None:
        for name, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size),
                            ("num_hidden_layers", num_hidden_layers),
                            ("max_position_embeddings", max_position_embeddings), ("kernel_len", kernel_len),
                            ("ffn_mult", ffn_mult), ("time_kernel_size", time_kernel_size),
                            ("chunk_size", chunk_size), ("fft_min_length", fft_min_length)):
            check_positive(name, value)
        if kernel_len > max_position_embeddings:
            raise ValueError(f"`kernel_len` ({kernel_len}) must not exceed `max_position_embeddings` "
                             f"({max_position_embeddings}): the kernel would be longer than any window.")
        if time_kernel_size > max_position_embeddings:
            raise ValueError(f"`time_kernel_size` ({time_kernel_size}) must not exceed `max_position_embeddings` "
                             f"({max_position_embeddings}).")
        if chunk_size >= max_position_embeddings:
            raise ValueError(f"`chunk_size` ({chunk_size}) must be smaller than `max_position_embeddings` "
                             f"({max_position_embeddings}).")
        check_positive("transition_bins", transition_bins, allow_zero=True)
        check_positive("token_vocab_size", token_vocab_size, allow_zero=True)
        check_positive("char_loss_weight", char_loss_weight, allow_zero=True, integer=False)
        check_positive("token_loss_weight", token_loss_weight, allow_zero=True, integer=False)
        check_choice("context_pooling", context_pooling, CONTEXT_POOLINGS)
        check_choice("spectral_gating", spectral_gating, SPECTRAL_GATINGS)
        check_bool("phase_activation", phase_activation)
        check_choice("conv_impl", conv_impl, CONV_IMPLEMENTATIONS)
        if phase_activation and spectral_gating != "signal":
            raise ValueError("`phase_activation` rotates the signal's spectrum and has no causal form: it requires "
                             "`spectral_gating='signal'`.")
        check_interval("dropout", dropout, 0.0, 1.0)
        check_positive("layer_norm_eps", layer_norm_eps, integer=False)
        check_positive("initializer_range", initializer_range, allow_zero=True, integer=False)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.max_position_embeddings = max_position_embeddings
        self.kernel_len = kernel_len
        self.ffn_mult = ffn_mult
        self.time_kernel_size = time_kernel_size
        self.transition_bins = transition_bins
        self.cutoff = self.validate_cutoff(cutoff)
        self.chunk_size = chunk_size
        self.token_vocab_size = token_vocab_size
        self.char_loss_weight = char_loss_weight
        self.token_loss_weight = token_loss_weight
        self.context_pooling = context_pooling
        self.spectral_gating = spectral_gating
        self.phase_activation = phase_activation
        self.conv_impl = conv_impl
        self.fft_min_length = fft_min_length
        self.dropout = dropout
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def fft_size(self) -> int:
        """Points of the FFT grid on which the gates and the cutoff are defined."""
        return next_power_of_two(self.max_position_embeddings + self.kernel_len - 1)

    @property
    def num_freq_bins(self) -> int:
        """Bins of the real FFT grid (`fft_size // 2 + 1`)."""
        return self.fft_size // 2 + 1

    @property
    def layer_types(self) -> list[str]:
        """Each block's cache-layer type for transformers (a convolution history plus running sums, as Mamba's)."""
        return ["linear_attention"] * self.num_hidden_layers

    @property
    def is_causal(self) -> bool:
        """Whether no output depends on a later byte (false for the original's leaky variants)."""
        return self.context_pooling == "causal" and self.spectral_gating == "kernel" and not self.phase_activation

    def validate_cutoff(self, cutoff: int | None) -> int | None:
        """Return `cutoff` if it is `None` or a bin count in `[1, num_freq_bins]`, else raise a `ValueError`."""
        if cutoff is None:
            return None
        check_positive("cutoff", cutoff)
        bins = next_power_of_two(self.max_position_embeddings + self.kernel_len - 1) // 2 + 1
        if cutoff > bins:
            raise ValueError(f"`cutoff` ({cutoff}) exceeds the {bins} frequency bins of the FFT grid "
                             f"(max_position_embeddings + kernel_len - 1 rounded up to a power of two, halved, + 1).")
        return cutoff


__all__ = ["BicameralConfig"]
