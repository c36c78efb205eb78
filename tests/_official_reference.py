"""The official UniEmo model code (JiuTian-VL/UniEmo), transcribed for tests: what ``uniemo convert official`` reads
and ``uniemo export --official`` must write, and what the official forward computes.

Transcribed from ``train_vit_class/Emotion_clip.py`` (``ResidualAttentionBlock``, ``MulitHeadAttention``,
``PromptdownsampleLayer``, ``QueryPrompt``, ``Transformer_Vis``, ``VisionTransformer``, ``CLIP``), OpenAI CLIP's
``clip.model.Transformer`` (the text tower), ``training/model.py`` (``MLP``) and ``training/fine_tune.py``
(``Emotion_classifier``) with the same module and parameter names and the same forward. The only changes: the sizes
the official code hard-codes (the emotion head's 768, the mapper's 1024 -> 768) are arguments, so tiny models can be
built; ``timm``'s ``trunc_normal_`` is torch's; the debugging hooks (``save_attn``, ``pdb``) are left out.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn


class LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor):
        orig_type = x.dtype
        ret = super().forward(x.type(torch.float32))
        return ret.type(orig_type)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d_model: int, n_head: int, attn_mask: torch.Tensor | None = None):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = LayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(d_model, d_model * 4)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(d_model * 4, d_model)),
        ]))
        self.ln_2 = LayerNorm(d_model)
        self.attn_mask = attn_mask

    def attention(self, x: torch.Tensor):
        self.attn_mask = self.attn_mask.to(dtype=x.dtype, device=x.device) if self.attn_mask is not None else None
        return self.attn(x, x, x, need_weights=False, attn_mask=self.attn_mask)[0]

    def forward(self, x: torch.Tensor):
        x = x + self.attention(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class Transformer(nn.Module):  # clip.model.Transformer
    def __init__(self, width: int, layers: int, heads: int, attn_mask: torch.Tensor | None = None):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, attn_mask) for _ in range(layers)])

    def forward(self, x: torch.Tensor):
        return self.resblocks(x)


class MulitHeadAttention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0., proj_drop=0.):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, q, k, v):
        B, N, C = q.shape
        B, M, C = k.shape
        q = self.q_proj(q).reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        k = self.k_proj(k).reshape(B, M, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        v = self.v_proj(v).reshape(B, M, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class PromptdownsampleLayer(nn.Module):
    def __init__(self, d_model, nhead, dropout=0.):
        super().__init__()
        self.cross_attn = MulitHeadAttention(d_model, nhead, proj_drop=dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, d_model * 4),
            QuickGELU(),
            nn.Dropout(dropout),
            nn.Linear(d_model * 4, d_model),
        )

    def forward(self, x, visual):
        q = k = v = self.norm1(x)  # noqa: F841 (as in the official code)
        x = x + self.cross_attn(q, visual, visual)
        x = x + self.dropout(self.mlp(self.norm3(x)))
        return x


class QueryPrompt(nn.Module):
    def __init__(self, layers=2, embed_dim=512, alpha=1e-4):
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)
        self.query_decoder = nn.ModuleList([PromptdownsampleLayer(embed_dim, embed_dim // 64) for _ in range(layers)])
        self.query_alpha = nn.Parameter(torch.ones(embed_dim) * alpha)
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def forward(self, query, visual):
        query = query.permute(1, 0, 2)
        visual = visual.permute(1, 0, 2)
        visual = self.norm(visual)
        for layer in self.query_decoder:
            query = layer(query, visual)
        return query


class Transformer_Vis(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, attn_mask=None, query_len=10, split_num=3):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, attn_mask) for _ in range(layers)])
        self.split = self.layers / split_num
        self.visual_query_interact = nn.ModuleList()
        for _ in range(split_num - 1):
            self.visual_query_interact.append(QueryPrompt(layers=1, embed_dim=width, alpha=1e-4))

    def forward(self, x: torch.Tensor, visual_query_scene, visual_query_object):
        len_x = x.shape[0]
        len_query = visual_query_scene.shape[0]
        x = torch.cat([x, visual_query_scene], dim=0)
        visual_query_list = []
        visual_query_last_list = []
        for i in range(self.layers):
            x = self.resblocks[i](x)
            if i == self.split - 1:
                x, visual_query = x[:len_x, :, :], x[len_x:, :, :]
                visual_query = self.visual_query_interact[(int(i // self.split))](visual_query, x).permute(1, 0, 2)
                visual_query_list.append(visual_query.mean(dim=0))
                x = torch.cat([x, visual_query, visual_query_object], dim=0)
            elif i == self.split * 2 - 1:
                x, visual_query, visual_query_object = (x[:len_x, :, :], x[len_x:len_x + len_query, :, :],
                                                        x[len_x + len_query:, :, :])
                visual_query_object = self.visual_query_interact[(int(i // self.split))](
                    visual_query_object, x).permute(1, 0, 2)
                visual_query_list.append(visual_query_object.mean(dim=0))
                x = torch.cat([x, visual_query, visual_query_object], dim=0)
            elif i == self.layers - 1:
                visual_query_last_list.append(x[len_x:len_x + len_query, :, :].mean(dim=0))
                visual_query_last_list.append(x[len_x + len_query:, :, :].mean(dim=0))
        return x, visual_query_list, visual_query_last_list


class VisionTransformer(nn.Module):
    def __init__(self, input_resolution, patch_size, width, layers, heads, output_dim, query_len, query_layer):
        super().__init__()
        self.input_resolution = input_resolution
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(in_channels=3, out_channels=width, kernel_size=patch_size, stride=patch_size,
                               bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.visual_query_scene = nn.Embedding(query_len, width)
        self.visual_query_object = nn.Embedding(query_len, width)
        self.transformer = Transformer_Vis(width, layers, heads, query_len=query_len)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))
        self.query_len = query_len
        self.query_layer = query_layer

    def forward(self, x: torch.Tensor):
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1)
        x = x.permute(0, 2, 1)
        x = torch.cat([self.class_embedding.to(x.dtype)
                       + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device), x], dim=1)
        x = x + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        x = x.permute(1, 0, 2)
        visual_query_scene = self.visual_query_scene.weight.unsqueeze(0).repeat(x.shape[1], 1, 1)
        visual_query_object = self.visual_query_object.weight.unsqueeze(0).repeat(x.shape[1], 1, 1)
        length = visual_query_scene.shape[1]
        x, visual_query_list, visual_query_last_list = self.transformer(
            x, visual_query_scene.permute(1, 0, 2), visual_query_object.permute(1, 0, 2))
        x = x.permute(1, 0, 2)
        cls_fea = self.ln_post(x[:, 0, :])
        patch_token = x[:, 1: x.shape[1] - 2 * length, :]
        return cls_fea, patch_token, visual_query_list, visual_query_last_list


class CLIP(nn.Module):
    """``Emotion_clip.CLIP`` with a ViT visual tower (the official model of both stages)."""

    def __init__(self, embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size, context_length,
                 vocab_size, transformer_width, transformer_heads, transformer_layers, query_len, query_layer):
        super().__init__()
        self.context_length = context_length
        vision_heads = vision_width // 64
        self.visual = VisionTransformer(
            input_resolution=image_resolution, patch_size=vision_patch_size, width=vision_width,
            layers=vision_layers, heads=vision_heads, output_dim=embed_dim, query_len=query_len,
            query_layer=query_layer,
        )
        self.transformer = Transformer(width=transformer_width, layers=transformer_layers, heads=transformer_heads,
                                       attn_mask=self.build_attention_mask())
        self.vocab_size = vocab_size
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(self.context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * np.log(1 / 0.07))
        self.logit_scale_object = nn.Parameter(torch.ones([]) * np.log(1 / 0.07))
        self.visual_query_scene_proj = nn.Parameter(torch.randn(vision_width, embed_dim))
        self.visual_query_object_proj = nn.Parameter(torch.randn(vision_width, embed_dim))
        self.visual_query_scene_last_proj = nn.Parameter(torch.randn(vision_width, embed_dim))
        self.visual_query_object_last_proj = nn.Parameter(torch.randn(vision_width, embed_dim))
        self.logit_scale_last = nn.Parameter(torch.ones([]) * np.log(1 / 0.07))
        self.logit_scale_object_last = nn.Parameter(torch.ones([]) * np.log(1 / 0.07))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=self.transformer.width ** -0.5)

    def build_attention_mask(self):
        mask = torch.empty(self.context_length, self.context_length)
        mask.fill_(float("-inf"))
        mask.triu_(1)
        return mask

    @property
    def dtype(self):
        return self.visual.conv1.weight.dtype

    def encode_image(self, image):
        return self.visual(image.type(self.dtype))

    def forward(self, image, scene_text=None, object_text=None):  # the eval branch (the official inference)
        cls_fea, patch_token, visual_query_list, _ = self.encode_image(image)
        return cls_fea, patch_token, visual_query_list


class MLP(nn.Module):  # training/model.py, 1024 -> 768 as arguments
    def __init__(self, num_fc_layers=2, need_ReLU=False, need_LN=False, need_Dropout=False, in_dim=1024, out_dim=768):
        super().__init__()
        layers = [nn.Linear(in_dim, in_dim)]
        if need_LN is True:
            layers.append(nn.LayerNorm(in_dim))
        if need_ReLU is True:
            layers.append(nn.ReLU())
        if need_Dropout is True:
            layers.append(nn.Dropout(0.5))
        for _ in range(num_fc_layers - 2):
            layers.append(nn.Linear(in_dim, in_dim))
            if need_LN is True:
                layers.append(nn.LayerNorm(in_dim))
            if need_ReLU is True:
                layers.append(nn.ReLU())
            if need_Dropout is True:
                layers.append(nn.Dropout(0.5))
        layers.append(nn.Linear(in_dim, out_dim))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x):
        return self.mlp(x)


class Emotion_classifier(nn.Module):  # training/fine_tune.py, hidden 768 as an argument
    def __init__(self, vision_width, hidden=768):
        super().__init__()
        self.fc0 = nn.Linear(vision_width, hidden)
        self.relu = nn.ReLU()
        self.drop_out = nn.Dropout(0.5)
        self.fc1 = nn.Linear(hidden, 8)

    def forward(self, x):
        x = self.fc0(x)
        x = self.drop_out(self.relu(x))
        x = self.fc1(x)
        return x


def tiny_official_clip(seed: int, *, width=128, layers=6, patch=8, image=32, embed_dim=32, queries=8,
                       text_width=32, text_layers=1, vocab=64, context=16) -> CLIP:
    """A tiny official model whose every parameter (LayerNorms too) is perturbed, so a wrong mapping shows."""
    torch.manual_seed(seed)
    model = CLIP(embed_dim, image, layers, width, patch, context, vocab, text_width, 2, text_layers, queries, 31)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()
