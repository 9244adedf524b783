"""What each number counts (design/conventions.md), as the app's Conventions expander shows it."""

CONVENTIONS_MARKDOWN = """
**Units.** FLOPs = 2 × multiply-accumulates (fvcore's MACs are doubled in one place). Parameters and
FLOPs use SI prefixes (K = 10³, M = 10⁶, G = 10⁹, T = 10¹²). Memory uses binary prefixes: GiB = 2³⁰
bytes (never GB); exports carry exact integers and bytes.

**Parameters.** Unique tensors only: the tied embedding / LM head counts once; buffers are not
parameters. *Total* is everything registered (all E experts: what must be stored). *Active* is what one
series uses: the shared parts, the router and the K chosen experts (for token_ffn, K experts per MoE
block, as every token uses K).

**FLOPs.** Matrix products only (linear layers, attention scores and weighted sums); softmax, norms,
activations and other elementwise work are not counted. Decoder self-attention scores are counted in
full (no halving for the causal mask), as the counters measure.
- *Forward*: one teacher-forced batch at S = context + 1 encoder and T = prediction + 1 decoder tokens
  (the tokenizer appends EOS).
- *Training step*: forward + backward = 3 × forward (a matmul's backward computes the input and the
  weight gradients, each as costly as the forward).
- *Forecast*: one encoder pass per series, then N × prediction decoder steps with a KV cache, plus the
  heads.
- *MoE*: compute follows sparse dispatch: K experts per series (shared_then_expert, expert_only) or per
  token (token_ffn), plus the router. Dense dispatch (Advanced) runs all E and masks.

**Memory.**
- *Weights*: parameters × bytes (fp32 4, fp16/bf16 2, int8 1); every expert is resident, since the series
  of a batch pick different experts. "Only active experts resident" is a labelled what-if, never the
  default.
- *Training step*, per parameter with Adam/AdamW: fp32 4 weights + 4 gradients + 8 moments = 16 bytes;
  AMP keeps fp32 weights (also 16, only activations shrink); pure bf16 2 + 2 + 8 = 12; SGD with momentum
  12 (fp32). Plus the activations saved for backward, as CUDA kernels keep them (bool dropout masks).
- *Forecast*: weights + KV cache (Ld × 2 × H·Dk × bytes × (S + t) × N × B: `generate` copies the encoder
  output per sample path) + the encoder output per path + the largest live activation.

References: Kaplan et al. 2020 (arXiv:2001.08361); Narayanan et al. 2021 (arXiv:2104.04473); Fedus et al.
2021, Switch (arXiv:2101.03961); Korthikanti et al. 2022 (arXiv:2205.05198); Rajbhandari et al. 2020,
ZeRO (arXiv:1910.02054).
"""
