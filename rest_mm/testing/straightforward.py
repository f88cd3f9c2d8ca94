"""A straightforward ResT / ResTv2: the yardstick for ``tools/benchmark.py`` and the tests.

Written op by op from ``ARCHITECTURE.md`` (tests/data/reference/) with the authors' key
names, so it loads their checkpoints as they are: tokens are ``B×N×C``; every convolution
reshapes them to a ``B×C×h×w`` map and back; v1's head interaction is a 1×1 ``Conv2d``
over the ``B×n×N×N'`` logits followed by a softmax and an ``nn.InstanceNorm2d`` over each
head's map; every attention materialises its ``N×N'`` map. It is deliberately not
optimised: it shows what the package's implementation (``rest_mm/rest.py``) is measured
against, and the tests prove both compute the same function.

Like the package (and unlike the released code), it reads each stage's size from the
tensors, so inputs need not be multiples of 32.

Usage::

    model = straightforward.build('rest_small')    # or 'restv2_tiny', ...
    stage_maps = model(images)                     # 4 NCHW maps
    ours = rest_mm.ResT('small')
    load_converted_state_dict(ours, convert_checkpoint(model.state_dict()))
"""
from typing import List, Sequence

import torch
from torch import nn

from ..presets import ARCH_ZOOS, parse_preset_name


def tokens_to_map(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``B×N×C`` tokens to a ``B×C×h×w`` map."""
    B, _, C = x.shape
    return x.permute(0, 2, 1).reshape(B, C, h, w)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``B×C×h×w`` map to ``B×N×C`` tokens.

    Not the authors' ``x.flatten(2).transpose(1, 2)``, the same values: at batch 1 the
    backward of that view hands the map's gradient on channels-last with a batch stride of
    ``C``, and torch's CPU batch-norm backward (2.1 to 2.14 at least, train and eval) gets
    such a gradient wrong, so every parameter before a BatchNorm got a wrong gradient.
    This backward gives the map's gradient the canonical batch stride.
    """
    B, C = x.shape[:2]
    return x.permute(0, 2, 3, 1).reshape(B, -1, C)


class PA(nn.Module):
    """``x * sigmoid(dwconv3x3(x))`` on a NCHW map."""

    def __init__(self, dim):
        super().__init__()
        self.pa_conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x):
        return x * torch.sigmoid(self.pa_conv(x))


class Mlp(nn.Module):

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """v1's EMSA (``version=1``) or v2's attention with the upsample branch (``version=2``)."""

    def __init__(self, dim, num_heads, sr_ratio, version, apply_transform, eps):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.sr_ratio = sr_ratio
        self.version = version
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio + 1, stride=sr_ratio, padding=sr_ratio // 2,
                                groups=dim)
            self.sr_norm = nn.LayerNorm(dim, eps=eps)
        self.apply_transform = version == 1 and apply_transform and num_heads > 1
        if self.apply_transform:
            self.transform_conv = nn.Conv2d(num_heads, num_heads, 1)
            self.transform_norm = nn.InstanceNorm2d(num_heads)
        if version == 2:
            self.up = nn.Sequential(
                nn.Conv2d(dim, sr_ratio * sr_ratio * dim, 3, padding=1, groups=dim),
                nn.PixelShuffle(sr_ratio))
            self.up_norm = nn.LayerNorm(dim, eps=eps)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, h, w):
        B, N, C = x.shape
        n, d = self.num_heads, self.head_dim
        q = self.q(x).reshape(B, N, n, d).permute(0, 2, 1, 3)
        if self.sr_ratio > 1:
            reduced = self.sr(tokens_to_map(x, h, w))
            hr, wr = reduced.shape[2:]
            reduced = self.sr_norm(map_to_tokens(reduced))
        else:
            reduced, hr, wr = x, h, w
        kv = self.kv(reduced).reshape(B, -1, 2, n, d).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]
        attn = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        if self.apply_transform:
            attn = self.transform_conv(attn)
            attn = attn.softmax(dim=-1)
            attn = self.transform_norm(attn)
        else:
            attn = attn.softmax(dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(B, N, C)
        if self.version == 2:
            value_map = v.transpose(-2, -1).reshape(B, C, hr, wr)
            up = self.up(value_map)[:, :, :h, :w]
            out = out + self.up_norm(map_to_tokens(up))
        return self.proj(out)


class Block(nn.Module):

    def __init__(self, dim, num_heads, sr_ratio, version, apply_transform, eps):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, sr_ratio, version, apply_transform, eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, dim * 4)

    def forward(self, x, h, w):
        x = x + self.attn(self.norm1(x), h, w)
        return x + self.mlp(self.norm2(x))


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over the channels of a ``B×C×h×w`` map, written out."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x):
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class StemV1(nn.Module):

    def __init__(self, out_channels):
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(3, mid, 3, stride=2, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=1, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_channels, 3, stride=2, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.pos = PA(out_channels)

    def forward(self, x):
        x = self.relu(self.norm1(self.conv1(x)))
        x = self.relu(self.norm2(self.conv2(x)))
        return self.pos(self.conv3(x))


class PatchEmbedV1(nn.Module):

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(out_channels)
        self.pos = PA(out_channels)

    def forward(self, x):
        return self.pos(self.norm(self.conv(x)))


class StemV2(nn.Module):

    def __init__(self, out_channels, eps):
        super().__init__()
        mid = out_channels // 2
        self.proj = nn.Sequential(
            nn.Conv2d(3, mid, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, out_channels, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 1))
        self.pos = PA(out_channels)
        self.norm = nn.LayerNorm(out_channels, eps=eps)

    def forward(self, x):
        return self.pos(self.proj(x))


class PatchEmbedV2(nn.Module):

    def __init__(self, in_channels, out_channels, eps):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)
        self.pos = PA(out_channels)
        self.norm = nn.LayerNorm(out_channels, eps=eps)

    def forward(self, x):
        return self.pos(self.proj(x))


class StraightforwardResT(nn.Module):
    """The authors' ImageNet model without its classifier head.

    ``forward`` returns the four stage maps as the reference data hold them
    (tests/data/reference/README.md): each stage's last block output as NCHW; for v1 the
    classifier's ``norm`` is applied to stage 4. The classifier head's keys, if present in
    a checkpoint, are not part of this model.

    Args:
        version (int): 1 for ResT, 2 for ResTv2.
        embed_dims, depths, num_heads, sr_ratios (Sequence[int]): Per-stage settings.
        apply_transform (bool): v1's head interaction (ignored by v2, which has none).
        detection_norms (bool): Add the output norms of the authors' detectron2 backbones,
            under their names, and return the normalised maps: v1 ``norm1``..``norm3`` after
            stages 1-3 sit in the main path (the next stage consumes the normalised map)
            and stage 4 keeps ``norm``; v2 ``norm_1``..``norm_4`` are channels-first
            LayerNorms (in a Sequential) on side branches.
    """

    def __init__(self, version: int, embed_dims: Sequence[int], depths: Sequence[int],
                 num_heads: Sequence[int] = (1, 2, 4, 8), sr_ratios: Sequence[int] = (8, 4, 2, 1),
                 apply_transform: bool = True, detection_norms: bool = False):
        super().__init__()
        if version not in (1, 2):
            raise ValueError(f'version must be 1 or 2, got {version}')
        self.version = version
        eps = 1e-5 if version == 1 else 1e-6
        if version == 1:
            self.stem = StemV1(embed_dims[0])
        else:
            self.stem = StemV2(embed_dims[0], eps)
        for i in range(4):
            if i > 0:
                embed = (PatchEmbedV1(embed_dims[i - 1], embed_dims[i]) if version == 1 else
                         PatchEmbedV2(embed_dims[i - 1], embed_dims[i], eps))
                self.add_module(f'patch_embed_{i + 1}' if version == 1 else f'patch_{i + 1}',
                                embed)
            self.add_module(f'stage{i + 1}', nn.ModuleList([
                Block(embed_dims[i], num_heads[i], sr_ratios[i], version, apply_transform, eps)
                for _ in range(depths[i])
            ]))
        self.norm = nn.LayerNorm(embed_dims[3], eps=eps)
        self.detection_norms = detection_norms
        if detection_norms and version == 1:
            for i in range(3):
                self.add_module(f'norm{i + 1}', nn.LayerNorm(embed_dims[i], eps=eps))
        elif detection_norms:
            for i in range(4):
                self.add_module(f'norm_{i + 1}',
                                nn.Sequential(ChannelsFirstLayerNorm(embed_dims[i], eps)))

    def _downsample(self, i: int) -> nn.Module:
        if i == 0:
            return self.stem
        return getattr(self, f'patch_embed_{i + 1}' if self.version == 1 else f'patch_{i + 1}')

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        feature_map, outs = x, []
        for i in range(4):
            downsample = self._downsample(i)
            feature_map = downsample(feature_map)
            h, w = feature_map.shape[2:]
            x = map_to_tokens(feature_map)
            if self.version == 2:
                x = downsample.norm(x)
            for block in getattr(self, f'stage{i + 1}'):
                x = block(x, h, w)
            if self.version == 1 and i == 3:
                x = self.norm(x)
            elif self.version == 1 and self.detection_norms:
                x = getattr(self, f'norm{i + 1}')(x)
            feature_map = tokens_to_map(x, h, w)
            if self.version == 2 and self.detection_norms:
                outs.append(getattr(self, f'norm_{i + 1}')(feature_map))
            else:
                outs.append(feature_map)
        return outs


def build(name: str, apply_transform: bool = True,
          detection_norms: bool = False) -> StraightforwardResT:
    """A straightforward model by preset name (``rest_small``, ``restv2_tiny``, ...; see
    :data:`rest_mm.presets.PRESET_NAMES`)."""
    model_name, arch = parse_preset_name(name)
    values = ARCH_ZOOS[model_name][arch]
    return StraightforwardResT(1 if model_name == 'ResT' else 2, values['embed_dims'],
                               values['depths'], values['num_heads'], values['sr_ratios'],
                               apply_transform, detection_norms)
