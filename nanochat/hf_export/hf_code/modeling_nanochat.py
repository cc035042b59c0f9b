"""A nanochat GPT for Hugging Face transformers: the same computation as nanochat/gpt.py, written to transformers'
conventions (a PreTrainedModel, keys and values kept in a transformers Cache, so `generate()` works).

Standalone: this file ships inside every export and must not import nanochat. What it computes, in order:
token embedding -> RMSNorm -> [smear] = x0; per layer: x = resid_lambda*x + x0_lambda*x0, then a pre-norm block
(attention with RoPE, QK-norm scaled by 1.2, GQA, a per-layer sliding window, value embeddings mixed into V through
a gate; a ReLU² MLP); [backout] -> RMSNorm -> LM head -> fp32 logits soft-capped with tanh. RMSNorm has no weights.

Shapes: B batch, T new tokens, L cached + new tokens, C hidden, H query heads, Hkv key/value heads, D head dim.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_nanochat import NanoChatGPTConfig

# transformers renamed the outputs' `past_key_values` to `cache`; build outputs with whichever this version has.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, H, D); cos, sin: (B, T, 1, D/2). nanochat's convention: halves, rotated by -angle."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class NanoChatGPTAttention(nn.Module):
    def __init__(self, config: NanoChatGPTConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                      config.head_dim)
        self.window = config.attention_windows[layer]
        self.qk_scale = config.qk_norm_scale
        self.gate_channels = config.value_embedding_gate_channels
        C = config.hidden_size
        self.c_q = nn.Linear(C, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, C, bias=False)
        has_ve = layer in config.value_embedding_layers
        self.ve_gate = nn.Linear(self.gate_channels, self.n_kv_head, bias=False) if has_ve else None

    def forward(self, x, ve, cos, sin, mask_of, cache: Cache | None):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :self.gate_channels]))  # (B, T, Hkv)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = rotary(q, cos, sin), rotary(k, cos, sin)
        q, k = rms_norm(q) * self.qk_scale, rms_norm(k) * self.qk_scale  # QK-norm after RoPE
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H or Hkv, T, D)
        if cache is not None:
            k, v = cache.update(k, v, self.layer)  # (B, Hkv, L, D)
        mask = mask_of(self.window)  # None = plain causal over T == L
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv_head != self.n_head)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class NanoChatGPTMLP(nn.Module):
    def __init__(self, config: NanoChatGPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, 4 * config.hidden_size, bias=False)
        self.c_proj = nn.Linear(4 * config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class NanoChatGPTBlock(nn.Module):
    def __init__(self, config: NanoChatGPTConfig, layer: int):
        super().__init__()
        self.attn = NanoChatGPTAttention(config, layer)
        self.mlp = NanoChatGPTMLP(config)

    def forward(self, x, ve, cos, sin, mask_of, cache):
        x = x + self.attn(rms_norm(x), ve, cos, sin, mask_of, cache)
        return x + self.mlp(rms_norm(x))


class NanoChatGPTPreTrainedModel(PreTrainedModel):
    config: NanoChatGPTConfig  # how transformers 5 finds the config class
    config_class = NanoChatGPTConfig  # and how transformers 4 does
    base_model_prefix = "model"
    _no_split_modules = ["NanoChatGPTBlock"]
    supports_gradient_checkpointing = False
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        # Exports always carry every weight; this only gives from_config() models finite values.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, NanoChatGPTModel):
            nn.init.ones_(module.resid_lambdas)
            nn.init.zeros_(module.x0_lambdas)
            if module.smear_lambda is not None:
                nn.init.zeros_(module.smear_lambda)
            if module.backout_lambda is not None:
                nn.init.constant_(module.backout_lambda, 0.2)


class NanoChatGPTModel(NanoChatGPTPreTrainedModel):
    """The transformer up to the final norm; weight names follow nanochat's GPT, so a state dict maps one to one."""

    def __init__(self, config: NanoChatGPTConfig):
        super().__init__(config)
        V, C, L = config.vocab_size, config.hidden_size, config.num_hidden_layers
        kv_dim = config.num_key_value_heads * config.head_dim
        self.wte = nn.Embedding(V, C)
        self.blocks = nn.ModuleList([NanoChatGPTBlock(config, i) for i in range(L)])
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, kv_dim) for i in config.value_embedding_layers})
        self.resid_lambdas = nn.Parameter(torch.ones(L))
        self.x0_lambdas = nn.Parameter(torch.zeros(L))
        self.smear_gate = nn.Linear(config.smear_gate_channels, 1, bias=False) if config.smear else None
        self.smear_lambda = nn.Parameter(torch.zeros(1)) if config.smear else None
        self.backout_lambda = nn.Parameter(torch.full((1,), 0.2)) if config.backout else None
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def _smear(self, x: torch.Tensor, cache: Cache | None, past: int,
               attention_mask: torch.Tensor | None) -> torch.Tensor:
        """x[t] += smear_lambda * sigmoid(smear_gate(x[t, :24])) * x[t-1]; the previous token of the first new one
        is kept on the cache object between calls, as nanochat's KVCache.prev_embedding."""
        B, T, _ = x.shape
        prev = getattr(cache, "nanochat_prev_embedding", None) if past > 0 else None
        first = prev[:, None].to(x.dtype) if prev is not None else torch.zeros_like(x[:, :1])
        x_prev = torch.cat([first, x[:, :-1]], dim=1)  # (B, T, C)
        index = past + torch.arange(T, device=x.device) - 1  # position of each token's predecessor
        valid = (index >= 0)[None, :].expand(B, T)
        if attention_mask is not None:  # a padding predecessor contributes nothing
            valid = valid & attention_mask[:, index.clamp(min=0)].bool()
        gate = torch.sigmoid(self.smear_gate(x[..., :self.config.smear_gate_channels]))  # (B, T, 1)
        if cache is not None:
            cache.nanochat_prev_embedding = x[:, -1].detach()
        return x + self.smear_lambda.to(x.dtype) * gate * x_prev * valid[..., None].to(x.dtype)

    def _mask_builder(self, B: int, T: int, past: int, attention_mask: torch.Tensor | None, device):
        """window -> boolean mask (B or 1, 1, T, L), or None where plain causal attention is the same thing."""
        L = past + T
        qpos = past + torch.arange(T, device=device)
        diff = qpos[:, None] - torch.arange(L, device=device)[None, :]  # (T, L)
        keep_keys = attention_mask[:, None, None, :L].bool() if attention_mask is not None else None
        plain = past == 0 and (attention_mask is None or bool(attention_mask.all()))
        masks: dict[int, torch.Tensor | None] = {}

        def mask_of(window: int):
            if window not in masks:
                if plain and window >= T:
                    masks[window] = None
                else:
                    m = ((diff >= 0) & (diff < window))[None, None]  # (1, 1, T, L)
                    masks[window] = m & keep_keys if keep_keys is not None else m
            return masks[window]
        return mask_of

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                past_key_values: Cache | None = None, inputs_embeds: torch.Tensor | None = None,
                use_cache: bool | None = None, **kwargs):
        if input_ids is None:
            raise ValueError("nanochat models need input_ids (value embeddings are looked up by token id)")
        cache = cache if cache is not None else past_key_values
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        B, T = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = (past + torch.arange(T, device=input_ids.device))[None].expand(B, T)
        # RoPE angles in fp32 as nanochat computes them; computed per call rather than kept in a buffer, which
        # from_pretrained's meta-device loading would leave unfilled.
        half = self.config.head_dim // 2
        inv_freq = 1.0 / self.config.rope_theta ** (torch.arange(half, dtype=torch.float32, device=input_ids.device)
                                                    / half)
        angles = position_ids.to(torch.float32)[..., None] * inv_freq  # (B, T, D/2)
        x = rms_norm(self.wte(input_ids) if inputs_embeds is None else inputs_embeds)
        if self.config.smear:  # on the normalised embeddings, as nanochat's GPT
            x = self._smear(x, cache, past, attention_mask)
        cos, sin = angles.cos()[:, :, None].to(x.dtype), angles.sin()[:, :, None].to(x.dtype)  # (B, T, 1, D/2)
        mask_of = self._mask_builder(B, T, past, attention_mask, x.device)
        x0, x_mid = x, None
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i].to(x.dtype) * x + self.x0_lambdas[i].to(x.dtype) * x0
            ve = self.value_embeds[str(i)](input_ids) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, mask_of, cache)
            if i == self.config.backout_layer:
                x_mid = x
        if self.config.backout:
            x = x - self.backout_lambda.to(x.dtype) * x_mid
        return rms_norm(x), cache


class NanoChatGPTForCausalLM(NanoChatGPTPreTrainedModel, GenerationMixin):
    def __init__(self, config: NanoChatGPTConfig):
        super().__init__(config)
        self.model = NanoChatGPTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.wte

    def set_input_embeddings(self, value):
        self.model.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                past_key_values: Cache | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        hidden, cache = self.model(input_ids, attention_mask, position_ids, cache, past_key_values, inputs_embeds,
                                   use_cache)
        if logits_to_keep:  # generation needs the last position only: skip the LM head for the rest
            hidden = hidden[:, -logits_to_keep:]
        cap = self.config.final_logit_softcapping
        logits = self.lm_head(hidden).float()
        logits = cap * torch.tanh(logits / cap)
        loss = None
        if labels is not None:  # transformers' convention: labels are the inputs, shifted here; -100 = ignore
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})
