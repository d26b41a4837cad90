"""A plain-torch Qwen2 / Qwen3 / Llama decoder over HF-named tensors, with a preallocated KV cache.

The embedded engine's model: the same math as the Megatron actor (RMSNorm, rotate-half RoPE with
Llama 3 scaling if configured, grouped-query attention with optional q/k/v biases and per-head q/k
RMSNorm before RoPE, SwiGLU), written for batched incremental decoding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_fipo.model_arch import ModelArch


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    var = x.float().pow(2).mean(-1, keepdim=True)
    return (x.float() * torch.rsqrt(var + eps)).to(x.dtype) * weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class TorchDecoder:
    def __init__(self, arch: ModelArch, weights: dict[str, torch.Tensor]):
        self.arch = arch
        self.w = weights
        self.inv_freq = arch.rope_inv_freq(torch.float64)

    def lm_head(self) -> torch.Tensor:
        return self.w["model.embed_tokens.weight"] if self.arch.tie_word_embeddings else self.w["lm_head.weight"]

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.double().unsqueeze(-1) * self.inv_freq.to(positions.device)  # [B, T, d/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype).unsqueeze(1), emb.sin().to(dtype).unsqueeze(1)  # [B, 1, T, d]

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device) -> list[torch.Tensor]:
        a = self.arch
        shape = (2, batch, a.num_kv_heads, max_len, a.head_dim)
        return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(a.num_layers)]

    @torch.no_grad()
    def forward(
        self,
        tokens: torch.Tensor,  # [B, T]
        positions: torch.Tensor,  # [B, T]
        cache: list[torch.Tensor],
        start: int,  # cache slot of tokens[:, 0]
        attn_mask: torch.Tensor,  # [B, 1, T, start + T] bool, True = attend
    ) -> torch.Tensor:
        """Hidden states after the final norm, [B, T, H]; fills cache[:, :, :, start:start+T]."""
        a, w = self.arch, self.w
        b, t = tokens.shape
        x = F.embedding(tokens, w["model.embed_tokens.weight"])
        cos, sin = self._rope(positions, x.dtype)
        groups = a.num_attention_heads // a.num_kv_heads
        for i in range(a.num_layers):
            p = f"model.layers.{i}."
            h = _rms_norm(x, w[p + "input_layernorm.weight"], a.rms_norm_eps)
            q = F.linear(h, w[p + "self_attn.q_proj.weight"], w.get(p + "self_attn.q_proj.bias"))
            k = F.linear(h, w[p + "self_attn.k_proj.weight"], w.get(p + "self_attn.k_proj.bias"))
            v = F.linear(h, w[p + "self_attn.v_proj.weight"], w.get(p + "self_attn.v_proj.bias"))
            q = q.view(b, t, a.num_attention_heads, a.head_dim).transpose(1, 2)
            k = k.view(b, t, a.num_kv_heads, a.head_dim).transpose(1, 2)
            v = v.view(b, t, a.num_kv_heads, a.head_dim).transpose(1, 2)
            if a.qk_norm:
                q = _rms_norm(q, w[p + "self_attn.q_norm.weight"], a.rms_norm_eps)
                k = _rms_norm(k, w[p + "self_attn.k_norm.weight"], a.rms_norm_eps)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            kv = cache[i]
            kv[0, :, :, start : start + t] = k
            kv[1, :, :, start : start + t] = v
            # enable_gqa reads each KV head for its query group in place, instead of copying the
            # whole cache `groups` times per layer per decoded token.
            attn = F.scaled_dot_product_attention(q, kv[0, :, :, : start + t], kv[1, :, :, : start + t],
                                                  attn_mask=attn_mask, enable_gqa=groups > 1)
            attn = attn.transpose(1, 2).reshape(b, t, a.num_attention_heads * a.head_dim)
            x = x + F.linear(attn, w[p + "self_attn.o_proj.weight"])
            h = _rms_norm(x, w[p + "post_attention_layernorm.weight"], a.rms_norm_eps)
            gate = F.linear(h, w[p + "mlp.gate_proj.weight"])
            up = F.linear(h, w[p + "mlp.up_proj.weight"])
            x = x + F.linear(F.silu(gate) * up, w[p + "mlp.down_proj.weight"])
        return _rms_norm(x, w["model.norm.weight"], a.rms_norm_eps)
