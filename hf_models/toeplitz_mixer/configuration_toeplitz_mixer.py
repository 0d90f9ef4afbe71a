"""Configuration of the multi-head Toeplitz mixer language model (seed 001, "Experiment 010")."""

from __future__ import annotations

from typing import Any

from ..configuration_zoo_common import ZooConfig, check_bool, check_choice, check_positive

KERNEL_PARAMETRISATIONS = ("identity", "softplus")
MIXER_IMPLEMENTATIONS = ("dense", "fft", "auto")
CONTEXT_OVERFLOW_POLICIES = ("error", "sliding_recompute")
DECODE_STEPS = ("auto", "dynamic", "static")
DECODE_MODES = ("exact", "recurrent")
ACTIVATIONS = ("gelu_pytorch_tanh", "gelu", "relu", "silu")


class ToeplitzMixerConfig(ZooConfig):
    r"""Configuration of a [`ToeplitzMixerModel`] / [`ToeplitzMixerForCausalLM`]: a pre-norm residual stack of
    (multi-head Toeplitz token mixer, MLP) blocks without attention and without positional embeddings.

    Each mixer head owns `hidden_size // num_heads` contiguous channels and one learned causal kernel of length
    `max_position_embeddings`; see `modeling_toeplitz_mixer.py` for the exact math.

    Args:
        vocab_size (`int`, *optional*, defaults to 4096): vocabulary size.
        hidden_size (`int`, *optional*, defaults to 512): width of the residual stream (the seed's `embed_dim`).
        num_hidden_layers (`int`, *optional*, defaults to 10): number of (mixer, MLP) blocks (`num_blocks`).
        num_heads (`int`, *optional*, defaults to 4): mixer heads; must divide `hidden_size`.
        intermediate_size (`int`, *optional*, defaults to 512): hidden width of the MLP (`mlp_dim`).
        max_position_embeddings (`int`, *optional*, defaults to 512): length of the Toeplitz kernels and of the
            per-position bias (`seq_len`); the hard context length, see `context_overflow`.
        dropout (`float`, *optional*, defaults to 0.1): dropout probability inside the MLP (the only dropout).
        hidden_act (`str`, *optional*, defaults to `"gelu_pytorch_tanh"`): MLP activation.
        do_toep_mean (`bool`, *optional*, defaults to `True`): divide the mixer output at position t by the sum of
            the kernel weights it used, `cumsum(k)[t]` (a weighted running average when k >= 0).
        do_toep_proj (`bool`, *optional*, defaults to `True`): wrap the mixer in an input projection (with bias)
            and an output projection (without bias).
        parallel_heads (`bool`, *optional*, defaults to `True`): default head schedule; `True` mixes all heads
            in one batched product, `False` loops over the heads. Same numbers, no parameters involved; `forward`
            and `generate` accept `parallel_heads=` to override it per call.
        kernel_param (`str`, *optional*, defaults to `"softplus"`): effective kernel `k = softplus(w)` (positive, so
            the mean normaliser never vanishes) or `k = w` (`"identity"`, the seed's published run).
        toep_norm_eps (`float`, *optional*, defaults to 0.0): floor on `|cumsum(k)|` in the mean normaliser
            (0: none, the seed's behaviour).
        mixer_impl (`str`, *optional*, defaults to `"dense"`): how a whole sequence is mixed: `"dense"` (Toeplitz
            matrix product), `"fft"` (FFT convolution, run in float32) or `"auto"` (FFT from `fft_min_length` tokens).
        fft_min_length (`int`, *optional*, defaults to 2048): sequence length from which `mixer_impl="auto"` uses FFT
            (the measured forward + backward crossover on a CPU at E=512; on GPUs the dense product wins longer).
        context_overflow (`str`, *optional*, defaults to `"error"`): what a sequence longer than
            `max_position_embeddings` does. `"error"`: `forward` raises a `ValueError` before any work (so
            `generate` fails loudly instead of drifting). `"sliding_recompute"`: the model reads only the last
            `max_position_embeddings` tokens, positions restarting at 0 (an uncached forward crops its input; the
            cache keeps the token ids and re-fills itself from the window once full, so cached equals uncached).
        decode_step (`str`, *optional*, defaults to `"auto"`): how a cached one-token step reads the history.
            `"dynamic"`: it reads the filled slots `[:t + 1]` only, O(E·t) per layer, but its tensor shapes change
            with t (the fastest eager step on a CPU). `"static"`: it writes the new slot at a tensor position
            (`index_copy_`) and reads the whole `(B, H, max_position_embeddings, D)` buffer with the kernel weights
            gathered by position (`weights[h, s] = k[h, t − s]` for s ≤ t, else 0) and tensor-valued positions for
            the normaliser and bias: every shape is independent of t and nothing branches on t, so the step runs
            under `torch.compile(fullgraph=True)` without recompiling and is built for CUDA graphs (O(E·S) per
            layer, fused by the compiler). `"auto"`: static while `torch.compile` traces the model, dynamic in
            eager mode (eagerly the dynamic step is the faster one: it reads t slots instead of S). Same numbers
            either way; a runtime switch, no parameters involved. Under `context_overflow="sliding_recompute"` a
            compiled step still reads the Python token count (to re-read the window once full), so it is
            specialised on it.
        decode_mode (`str`, *optional*, defaults to `"exact"`): how cached decoding mixes a new token. `"exact"`:
            against the whole stored history (O(E·t) per layer and token, memory O(E·S)). `"recurrent"`: each
            head's kernel is distilled (once per weight version, see `recurrent_toeplitz_mixer.py`) into its first
            `recurrent_window` taps, kept exact, plus `recurrent_state_size` complex modes beyond them, so a step
            costs O(E·(W + N)) and the state is constant-size; the prompt is still mixed exactly and only new tokens
            see the approximation. A runtime switch, no parameters involved.
        recurrent_state_size (`int`, *optional*, defaults to 16): modes N per head under `decode_mode="recurrent"`.
        recurrent_window (`int`, *optional*, defaults to 16): exact taps W per head under `decode_mode="recurrent"`
            (`0 <= W < max_position_embeddings`, checked when recurrent decoding is chosen; 0: all modes).
        initializer_range (`float`, *optional*, defaults to 0.2): std of the `Linear` and `Embedding` weights (the
            seed's 0.2, ten times the usual 0.02).
        toeplitz_init_std (`float`, *optional*, defaults to 0.2): std of the raw kernel parameters.
        rms_norm_eps (`float`, *optional*): epsilon of the RMSNorms; `None` uses `torch.finfo(dtype).eps` (the seed).
        use_cache (`bool`, *optional*, defaults to `True`): return the mixer-input cache for fast decoding.
        tie_word_embeddings (`bool`, *optional*, defaults to `False`): tie the LM head to the token embedding.
        pad_token_id / bos_token_id / eos_token_id (`int`, *optional*): special token ids.
    """

    model_type = "toeplitz_mixer"
    keys_to_ignore_at_inference = ["cache"]

    def __init__(
        self,
        vocab_size: int = 4096,
        hidden_size: int = 512,
        num_hidden_layers: int = 10,
        num_heads: int = 4,
        intermediate_size: int = 512,
        max_position_embeddings: int = 512,
        dropout: float = 0.1,
        hidden_act: str = "gelu_pytorch_tanh",
        do_toep_mean: bool = True,
        do_toep_proj: bool = True,
        parallel_heads: bool = True,
        kernel_param: str = "softplus",
        toep_norm_eps: float = 0.0,
        mixer_impl: str = "dense",
        fft_min_length: int = 2048,
        context_overflow: str = "error",
        decode_step: str = "auto",
        decode_mode: str = "exact",
        recurrent_state_size: int = 16,
        recurrent_window: int = 16,
        initializer_range: float = 0.2,
        toeplitz_init_std: float = 0.2,
        rms_norm_eps: float | None = None,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        **kwargs: Any,
    ) -> None:
        for name, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size),
                            ("num_hidden_layers", num_hidden_layers), ("num_heads", num_heads),
                            ("intermediate_size", intermediate_size),
                            ("max_position_embeddings", max_position_embeddings), ("fft_min_length", fft_min_length)):
            check_positive(name, value)
        if hidden_size % num_heads:
            raise ValueError(f"`hidden_size` ({hidden_size}) must be divisible by `num_heads` ({num_heads}).")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"`dropout` must lie in [0, 1), got {dropout!r}.")
        check_bool("do_toep_mean", do_toep_mean)
        check_bool("do_toep_proj", do_toep_proj)
        check_bool("parallel_heads", parallel_heads)
        check_choice("hidden_act", hidden_act, ACTIVATIONS)
        check_choice("kernel_param", kernel_param, KERNEL_PARAMETRISATIONS)
        check_choice("mixer_impl", mixer_impl, MIXER_IMPLEMENTATIONS)
        check_choice("context_overflow", context_overflow, CONTEXT_OVERFLOW_POLICIES)
        check_choice("decode_step", decode_step, DECODE_STEPS)
        check_choice("decode_mode", decode_mode, DECODE_MODES)
        check_positive("recurrent_state_size", recurrent_state_size)
        check_positive("recurrent_window", recurrent_window, allow_zero=True)
        if decode_mode == "recurrent" and recurrent_window >= max_position_embeddings:
            raise ValueError(f"`recurrent_window` ({recurrent_window}) must be smaller than "
                             f"`max_position_embeddings` ({max_position_embeddings}).")
        check_positive("toep_norm_eps", toep_norm_eps, allow_zero=True, integer=False)
        check_positive("initializer_range", initializer_range, allow_zero=True, integer=False)
        check_positive("toeplitz_init_std", toeplitz_init_std, allow_zero=True, integer=False)
        if rms_norm_eps is not None:
            check_positive("rms_norm_eps", rms_norm_eps, integer=False)

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_heads = num_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.dropout = dropout
        self.hidden_act = hidden_act
        self.do_toep_mean = do_toep_mean
        self.do_toep_proj = do_toep_proj
        self.parallel_heads = parallel_heads
        self.kernel_param = kernel_param
        self.toep_norm_eps = toep_norm_eps
        self.mixer_impl = mixer_impl
        self.fft_min_length = fft_min_length
        self.context_overflow = context_overflow
        self.decode_step = decode_step
        self.decode_mode = decode_mode
        self.recurrent_state_size = recurrent_state_size
        self.recurrent_window = recurrent_window
        self.initializer_range = initializer_range
        self.toeplitz_init_std = toeplitz_init_std
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def layer_types(self) -> list[str]:
        """Each block's cache-layer type for transformers (the history of its convolution's inputs)."""
        return ["conv"] * self.num_hidden_layers

    @property
    def head_dim(self) -> int:
        """Channels per mixer head (`hidden_size // num_heads`)."""
        return self.hidden_size // self.num_heads

    def num_parameters_closed_form(self) -> int:
        """The parameter count in closed form (untied head):
        `2·V·E + E + L·(2E + 2EF + F + E + 2HS + [do_toep_proj](2E² + E))`."""
        e, f, h, s = self.hidden_size, self.intermediate_size, self.num_heads, self.max_position_embeddings
        block = 2 * e + (2 * e * f + f + e) + 2 * h * s + (2 * e * e + e if self.do_toep_proj else 0)
        embeddings = self.vocab_size * e * (1 if self.tie_word_embeddings else 2)
        return embeddings + e + self.num_hidden_layers * block
