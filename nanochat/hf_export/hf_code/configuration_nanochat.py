"""Configuration of a nanochat GPT exported for Hugging Face transformers (loaded with trust_remote_code=True).

Standalone: this file ships inside every export and must not import nanochat. Every per-layer detail that nanochat
derives from its own config (attention windows, which layers carry value embeddings) is written out explicitly, so
the export does not depend on re-deriving it the same way.
"""

from transformers import PretrainedConfig


class NanoChatGPTConfig(PretrainedConfig):
    model_type = "nanochat_gpt"

    def __init__(self, vocab_size: int = 65536, hidden_size: int = 768, num_hidden_layers: int = 12,
                 num_attention_heads: int = 6, num_key_value_heads: int = 6, max_position_embeddings: int = 2048,
                 attention_windows: list[int] | None = None, value_embedding_layers: list[int] | None = None,
                 value_embedding_gate_channels: int = 12, rope_theta: float = 100_000.0, qk_norm_scale: float = 1.2,
                 final_logit_softcapping: float = 15.0, smear: bool = False, smear_gate_channels: int = 24,
                 backout: bool = False, backout_layer: int | None = None, use_cache: bool = True,
                 tie_word_embeddings: bool = False,
                 **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        # Tokens each layer's queries see, themselves included (key j is visible to query i when 0 <= i - j < w).
        self.attention_windows = list(attention_windows or [max_position_embeddings] * num_hidden_layers)
        self.value_embedding_layers = list(value_embedding_layers or [])
        self.value_embedding_gate_channels = value_embedding_gate_channels
        self.rope_theta = rope_theta
        self.qk_norm_scale = qk_norm_scale
        self.final_logit_softcapping = final_logit_softcapping
        self.smear = smear
        self.smear_gate_channels = smear_gate_channels
        self.backout = backout
        self.use_cache = use_cache
        self.backout_layer = num_hidden_layers // 2 if backout_layer is None else backout_layer
        if len(self.attention_windows) != num_hidden_layers:
            raise ValueError(f"attention_windows has {len(self.attention_windows)} entries for "
                             f"{num_hidden_layers} layers")
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
