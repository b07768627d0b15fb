"""GPT-NeoX's parallel residual (GPT-J style) as a Megatron-Core TransformerLayer.

Hugging Face ``GPTNeoXLayer`` with ``use_parallel_residual=True`` (every Pythia model) computes

    out = x + attn(ln1(x)) + mlp(ln2(x))

where Megatron-Core's stock layer chains them (``x + attn(ln1(x))`` feeds the MLP). Only the
residual wiring differs, so this subclass reuses the stock submodules (``input_layernorm``,
``self_attention``, ``pre_mlp_layernorm``, ``mlp``): parameter names, sharded-state-dict keys,
TP/SP/PP and the TE fused-layernorm linears all work unchanged. With TE specs the layernorms are
fused into ``linear_qkv`` and ``linear_fc1`` (both read ``x``), which is exactly this wiring too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import make_viewless_tensor


class ParallelResidualTransformerLayer(TransformerLayer):
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask=None,
        context=None,
        context_mask=None,
        rotary_pos_emb=None,
        rotary_pos_cos=None,
        rotary_pos_sin=None,
        attention_bias=None,
        inference_context=None,
        packed_seq_params=None,
        sequence_len_offset=None,
        padding_mask=None,
        **kwargs,
    ):
        residual = hidden_states
        attn_out, attn_bias = self.self_attention(
            self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            inference_context=inference_context,
            rotary_pos_emb=rotary_pos_emb,
            rotary_pos_cos=rotary_pos_cos,
            rotary_pos_sin=rotary_pos_sin,
            attention_bias=attention_bias,
            packed_seq_params=packed_seq_params,
            sequence_len_offset=sequence_len_offset,
        )
        mlp_out, mlp_bias = self.mlp(self.pre_mlp_layernorm(hidden_states))
        if attn_bias is not None:
            attn_out = attn_out + attn_bias
        if mlp_bias is not None:
            mlp_out = mlp_out + mlp_bias
        branch = attn_out + mlp_out
        if self.hidden_dropout > 0.0:
            branch = F.dropout(branch, p=self.hidden_dropout, training=self.training)
        output = residual + branch
        output = make_viewless_tensor(inp=output, requires_grad=output.requires_grad, keep_graph=True)
        return output, context
