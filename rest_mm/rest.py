"""ResT (NeurIPS 2021) and ResTv2 (NeurIPS 2022) as dense-prediction backbones.

The file reads top-down like the architecture: the positional encoding, the MLP, the two
attentions, the block, the stems and patch embeddings, the stage, then the two models. Their
presets are in ``rest_mm/presets.py``, v1's fused attention kernel in
``rest_mm/fused_attention.py``. Every module works on channels-last maps ``B×h×w×C`` (the
memory layout of the paper's ``B×N×C`` tokens), so the linear layers need no reshape and the
convolutions see a channels-last NCHW view of the same memory, with no copy either way.

Sizes are always read from the tensors, never derived as ``H // stride``: that is what lets
the models take inputs of any size with no padding and no interpolation.
"""
import math
import warnings
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmcv.cnn.bricks import DropPath
from mmengine.model import BaseModule
from mmengine.model.weight_init import constant_init, trunc_normal_init
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .fused_attention import MixedHeadAttentionFunction, mixed_head_attention, rows_per_block
from .presets import ARCH_ZOOS, NUM_STAGES, is_whole_number, resolve_arch
from .torch_compat import is_tracing
from .weights.backbone import load_pretrained


def _to_nchw(x: torch.Tensor) -> torch.Tensor:
    """``B×h×w×C`` to a channels-last ``B×C×h×w`` view (no copy)."""
    return x.permute(0, 3, 1, 2)


def _to_nhwc(x: torch.Tensor) -> torch.Tensor:
    """``B×C×h×w`` to ``B×h×w×C`` (a view when ``x`` is channels-last)."""
    return x.permute(0, 2, 3, 1)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """The input image in channels-last memory, so that every convolution after it runs
    channels-last (faster on CPU) and the stem's NHWC output is contiguous."""
    return x.contiguous(memory_format=torch.channels_last)


class PA(nn.Module):
    """Pixel-attention positional encoding: ``x * sigmoid(dwconv3x3(x))`` on NCHW maps.

    It has no size-dependent parameter, which is what frees the model from a fixed
    input size.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.pa_conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The sigmoid map that multiplies ``x`` (exposed for visualisation)."""
        return torch.sigmoid(self.pa_conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class Mlp(nn.Module):
    """Linear, exact GELU, Linear; on the CPU a block of tokens at a time.

    The hidden layer is four times wider than the tokens. At detection sizes it would
    be a tensor of a hundred MB or more per call, which the C allocator hands out as
    fresh pages that the kernel must fault in and zero every time; blocks of at most
    ``hidden_block_elements`` are reused from the heap instead, and bound inference
    memory. Tokens are independent, so blocking does not change the result. CUDA's
    caching allocator reuses memory anyway, so there the blocks would only add launches
    and a copy.
    """

    hidden_block_elements = 1 << 22

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        rows = max(1, self.hidden_block_elements // self.fc1.out_features)
        if tokens.shape[0] <= rows or not x.is_cpu or is_tracing():
            return self._mlp(x)
        blocks = [self._mlp(block) for block in tokens.split(rows)]
        return torch.cat(blocks).view(*x.shape[:-1], -1)


class ReducedKVAttention(nn.Module):
    """Multi-head attention whose keys and values come from a spatially reduced map.

    With ``sr_ratio > 1`` the map is reduced by a depth-wise conv with kernel
    ``sr + 1``, stride ``sr`` and padding ``sr // 2`` (``ceil(h / sr)`` rows for any
    ``h``), then layer-normed. Subclasses say what happens between the logits and the
    output projection.
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, qkv_bias: bool,
                 norm_eps: float, attn_drop: float = 0., proj_drop: float = 0.):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim {dim} is not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio + 1, stride=sr_ratio,
                                padding=sr_ratio // 2, groups=dim)
            self.sr_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``B×h×w×C`` to ``B×n×(h·w)×d``."""
        B, h, w, _ = x.shape
        return x.reshape(B, h * w, self.num_heads, self.head_dim).transpose(1, 2)

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The map keys and values are computed from, ``B×h'×w'×C``."""
        if self.sr_ratio == 1:
            return x
        return self.sr_norm(_to_nhwc(self.sr(_to_nchw(x))))

    def query_key_value(self, x: torch.Tensor):
        """Queries ``B×n×N×d``, keys and values ``B×n×N'×d`` and the reduced map's size."""
        q = self._split_heads(self.q(x))
        reduced = self.reduce(x)
        B, hr, wr, C = reduced.shape
        kv = self.kv(reduced).reshape(B, hr * wr, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v, (hr, wr)

    @staticmethod
    def _merge_heads(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """``B×n×(h·w)×d`` to ``B×h×w×C``."""
        B, n, _, d = x.shape
        return x.transpose(1, 2).reshape(B, h, w, n * d)


class EMSA(ReducedKVAttention):
    """ResT v1's efficient multi-head self-attention.

    With ``apply_transform`` and more than one head, the logits are mixed across heads
    by a 1×1 conv (``transform_conv``), soft-maxed, then instance-normalised over each
    head's ``N×N'`` map before ``@ v``. Without head mixing the attention is plain scaled
    dot-product (``F.scaled_dot_product_attention``).

    With head mixing it runs the fused kernel of ``rest_mm.fused_attention``, which
    computes the map in float32 under autocast: the instance norm of a nearly uniform
    map amplifies a bfloat16/float16 softmax's rounding (that module says by how much).
    """

    # Attention-map elements per block of query rows (16 MiB in float32): small enough to
    # bound memory and stay mostly in the last-level cache, large enough that the loop's
    # per-op overhead (a parallel region each) stays negligible.
    map_block_elements = 1 << 22

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, qkv_bias: bool = True,
                 apply_transform: bool = True, *, norm_eps: float,
                 attn_drop: float = 0., proj_drop: float = 0.):
        super().__init__(dim, num_heads, sr_ratio, qkv_bias, norm_eps, attn_drop, proj_drop)
        self.apply_transform = apply_transform and num_heads > 1
        if self.apply_transform:
            self.transform_conv = nn.Conv2d(num_heads, num_heads, 1)
            # The conv's bias adds one constant to every logit of a head and the softmax
            # removes it: it cannot change the output and its gradient is exactly zero. It
            # stays for the checkpoints but is left out of the computation, and frozen so
            # that DDP does not wait for its gradient.
            self.transform_conv.bias.requires_grad_(False)
        self.instance_norm_eps = 1e-5

    def _mixed_head_attention(self, q: torch.Tensor, k: torch.Tensor,
                              v: torch.Tensor) -> torch.Tensor:
        """``IN(softmax(mix(q·kᵀ·scale))) @ v`` for ``q`` ``B×n×N×d``, ``k, v`` ``B×n×N'×d``."""
        _, n, N, _ = q.shape
        mix = self.transform_conv.weight.view(n, n) * self.scale
        tracing = is_tracing()  # a traced graph would freeze the block size to this input's
        rows = N if tracing else rows_per_block(q, k, self.map_block_elements)
        drop = self.attn_drop if self.training else 0.
        records = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, mix))
        if records and not tracing:
            return MixedHeadAttentionFunction.apply(q, k, v, mix, rows, drop,
                                                    self.instance_norm_eps)
        return mixed_head_attention(q, k, v, mix, rows, drop, self.instance_norm_eps)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h, w, _ = x.shape
        q, k, v, _ = self.query_key_value(x)
        if self.apply_transform:
            out = self._mixed_head_attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop if self.training else 0.)
        return self.proj_drop(self.proj(self._merge_heads(out, h, w)))


class UpsampledValueAttention(ReducedKVAttention):
    """ResTv2's attention: plain softmax attention plus an "upsample" branch.

    The branch restores what the reduction discarded: the values, as a ``C×h'×w'`` map,
    go through a depth-wise 3×3 conv to ``sr²·C`` channels and a pixel shuffle back to
    ``sr·h' × sr·w'``, which is cropped to the query map ``h×w`` (it can be larger when a
    side is not a multiple of ``sr``), layer-normed, and added to the attention output.
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, qkv_bias: bool = True,
                 *, norm_eps: float, attn_drop: float = 0., proj_drop: float = 0.):
        super().__init__(dim, num_heads, sr_ratio, qkv_bias, norm_eps, attn_drop, proj_drop)
        self.up_conv = nn.Conv2d(dim, sr_ratio * sr_ratio * dim, 3, padding=1, groups=dim)
        self.up_norm = nn.LayerNorm(dim, eps=norm_eps)

    def upsample_values(self, v: torch.Tensor, reduced_hw: Tuple[int, int],
                        hw: Tuple[int, int]) -> torch.Tensor:
        value_map = _to_nchw(self._merge_heads(v, *reduced_hw))
        up = F.pixel_shuffle(self.up_conv(value_map), self.sr_ratio)
        h, w = hw
        return self.up_norm(_to_nhwc(up[:, :, :h, :w]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h, w, _ = x.shape
        q, k, v, reduced_hw = self.query_key_value(x)
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop if self.training else 0.)
        out = self._merge_heads(out, h, w) + self.upsample_values(v, reduced_hw, (h, w))
        return self.proj_drop(self.proj(out))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))``."""

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float, norm_eps: float,
                 drop: float = 0., drop_path: float = 0.):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = attn
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ResTStem(nn.Module):
    """ResT v1 stem (stride 4): conv-BN-ReLU, conv-BN-ReLU, conv, PA. Returns NHWC."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, mid, 3, stride=2, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=1, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_channels, 3, stride=2, padding=1, bias=False)
        self.pos = PA(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm1(self.conv1(_channels_last(x))), inplace=True)
        x = F.relu(self.norm2(self.conv2(x)), inplace=True)
        return _to_nhwc(self.pos(self.conv3(x)))


class ResTPatchEmbed(nn.Module):
    """ResT v1 downsampling between stages: stride-2 conv, BN, PA (NHWC in and out)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(out_channels)
        self.pos = PA(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _to_nhwc(self.pos(self.norm(self.conv(_to_nchw(x)))))


class ResTV2Stem(nn.Module):
    """ResTv2 stem (stride 4): conv-BN-ReLU twice, 1×1 conv, PA, LN. Returns NHWC."""

    def __init__(self, in_channels: int, out_channels: int, norm_eps: float):
        super().__init__()
        mid = out_channels // 2
        self.proj = nn.Sequential(
            nn.Conv2d(in_channels, mid, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, out_channels, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 1),
        )
        self.pos = PA(out_channels)
        self.norm = nn.LayerNorm(out_channels, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(_to_nhwc(self.pos(self.proj(_channels_last(x)))))


class ResTV2PatchEmbed(nn.Module):
    """ResTv2 downsampling between stages: stride-2 conv, PA, LN (NHWC in and out)."""

    def __init__(self, in_channels: int, out_channels: int, norm_eps: float):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)
        self.pos = PA(out_channels)
        self.norm = nn.LayerNorm(out_channels, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(_to_nhwc(self.pos(self.proj(_to_nchw(x)))))


class Stage(nn.Module):
    """An optional downsampling layer followed by blocks, with optional activation
    checkpointing per block."""

    def __init__(self, downsample: Optional[nn.Module], blocks: Sequence[nn.Module],
                 with_cp: bool = False):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.ModuleList(blocks)
        self.with_cp = with_cp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        for block in self.blocks:
            if self.with_cp and x.requires_grad:
                x = cp.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


def _check_rate(name: str, value: float, model: str):
    """Dropout and stochastic-depth rates are probabilities of dropping, below 1: at 1 every
    element is dropped and the rescaling by ``1 / (1 - p)`` divides by zero."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f'{model}: {name} must be a number in [0, 1), got {value!r}')


def _pretrained_cfg(init_cfg, model: str) -> Optional[dict]:
    """The ``Pretrained`` entry of ``init_cfg`` (a dict or a list of dicts, as mmengine
    accepts), checked to name a checkpoint; None when there is none."""
    entries = init_cfg if isinstance(init_cfg, (list, tuple)) else [init_cfg]
    pretrained = [e for e in entries if isinstance(e, dict) and e.get('type') == 'Pretrained']
    if len(pretrained) > 1:
        raise ValueError(f'{model}: init_cfg has {len(pretrained)} Pretrained entries; give one')
    if not pretrained:
        return None
    if not pretrained[0].get('checkpoint'):
        raise ValueError(f"{model}: init_cfg {pretrained[0]} has no 'checkpoint'; use "
                         f"dict(type='Pretrained', checkpoint=PATH)")
    return pretrained[0]


# mmengine's CheckpointLoader resolves these to weights of a named model of another zoo
# (ResNet, HRNet, ...): none holds a ResT or ResTV2.
_MODEL_ZOO_SCHEMES = ('open-mmlab://', 'openmmlab://', 'torchvision://', 'modelzoo://',
                      'mmcls://')


def _init_cfg_from_pretrained(pretrained, init_cfg, model: str):
    """``init_cfg`` with the deprecated ``pretrained`` argument folded in, as OpenMMLab
    backbones accept it (mmseg's ``EncoderDecoder`` passes ``model.pretrained`` on).

    Raises:
        ValueError: ``pretrained`` cannot name a ResT checkpoint (another zoo's model, not a
            string), or both it and ``init_cfg`` are given.
    """
    if pretrained is None:
        return init_cfg
    fix = (f"set model.pretrained=None and load {model} weights with model.backbone.init_cfg="
           f"dict(type='Pretrained', checkpoint=PATH)")
    if not isinstance(pretrained, str) or not pretrained:
        raise ValueError(f'{model}: pretrained must be a checkpoint path or URL, got '
                         f'{pretrained!r}; {fix}')
    if pretrained.lower().startswith(_MODEL_ZOO_SCHEMES):
        raise ValueError(f'{model}: pretrained={pretrained!r} names another architecture\'s '
                         f'weights in a model zoo (the base config was written for another '
                         f'backbone); {fix}')
    if init_cfg is not None:
        raise ValueError(f'{model}: got both pretrained={pretrained!r} and init_cfg={init_cfg}; '
                         f'give only init_cfg')
    warnings.warn(f'{model}: pretrained is deprecated; use init_cfg=dict(type=\'Pretrained\', '
                  f'checkpoint={pretrained!r})', FutureWarning, stacklevel=4)
    return dict(type='Pretrained', checkpoint=pretrained)


def _resolve_out_indices(out_indices: Union[int, Sequence[int]], model: str) -> Tuple[int, ...]:
    if is_whole_number(out_indices):
        out_indices = (out_indices, )
    # bool is an int (True would mean stage 1), and () would build a model with no output
    if not isinstance(out_indices, (list, tuple)) or not out_indices:
        raise ValueError(f'{model}: out_indices must be a stage index or a non-empty list or '
                         f'tuple of them (ints in 0..{NUM_STAGES - 1} or -{NUM_STAGES}..-1), '
                         f'got {out_indices!r}')
    resolved = []
    for index in out_indices:
        if not is_whole_number(index) or not -NUM_STAGES <= index < NUM_STAGES:
            raise ValueError(f'{model}: out_indices {tuple(out_indices)} must be stage indices '
                             f'in 0..{NUM_STAGES - 1} (or -{NUM_STAGES}..-1)')
        resolved.append(index % NUM_STAGES)
    if len(set(resolved)) != len(resolved):
        raise ValueError(f'{model}: out_indices {tuple(out_indices)} names a stage twice')
    return tuple(sorted(resolved))


class _ResTBase(BaseModule):
    """What ResT and ResTV2 share: stages, output norms, freezing, init and forward.

    Subclasses build ``self.stem`` and ``self.stages`` and name their output norms.
    """

    norm_eps: float  # the LayerNorms' epsilon, each subclass's (its authors' value)
    norm_in_path: bool = False

    def __init__(self, *, arch, in_channels, out_indices, drop_rate, attn_drop_rate,
                 drop_path_rate, frozen_stages, norm_eval, with_cp, init_cfg, pretrained):
        name = type(self).__name__
        init_cfg = _init_cfg_from_pretrained(pretrained, init_cfg, name)
        super().__init__(init_cfg=init_cfg)
        self.arch = resolve_arch(arch, name)
        self.embed_dims = tuple(self.arch['embed_dims'])
        self.out_indices = _resolve_out_indices(out_indices, name)
        if not is_whole_number(frozen_stages) or not -1 <= frozen_stages <= NUM_STAGES:
            raise ValueError(f'{name}: frozen_stages must be in -1..{NUM_STAGES}, got '
                             f'{frozen_stages}')
        if not is_whole_number(in_channels) or in_channels < 1:
            raise ValueError(f'{name}: in_channels must be positive, got {in_channels}')
        for rate_name, rate in (('drop_rate', drop_rate), ('attn_drop_rate', attn_drop_rate),
                                ('drop_path_rate', drop_path_rate)):
            _check_rate(rate_name, rate, name)
        self.pretrained_cfg = _pretrained_cfg(init_cfg, name)
        self.in_channels = in_channels
        self.drop_path_rate = drop_path_rate
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.with_cp = with_cp

    def _build_stages(self, attention: Callable[[int], nn.Module],
                      downsample: Callable[[int], nn.Module], drop_rate: float):
        """The four stages (``attention(i)`` and ``downsample(i)`` build stage ``i``'s
        parts), the output norms, and the freezing."""
        depths = self.arch['depths']
        total = sum(depths)
        # stochastic depth rises linearly over all blocks of all stages
        rates = [self.drop_path_rate * j / max(total - 1, 1) for j in range(total)]
        self.stages = nn.ModuleList()
        for i, depth in enumerate(depths):
            first = sum(depths[:i])
            blocks = [
                Block(self.embed_dims[i], attention(i), self.arch['mlp_ratio'], self.norm_eps,
                      drop_rate, rate) for rate in rates[first:first + depth]
            ]
            self.stages.append(Stage(downsample(i) if i > 0 else None, blocks, self.with_cp))
        for i in self.out_indices:
            self.add_module(f'norm{i}', nn.LayerNorm(self.embed_dims[i], eps=self.norm_eps))
        self._freeze_stages()

    def _freeze_stages(self):
        if self.frozen_stages < 0:
            return
        frozen = [self.stem]
        for i in range(self.frozen_stages):
            frozen.append(self.stages[i])
            if i in self.out_indices:
                frozen.append(getattr(self, f'norm{i}'))
        for module in frozen:
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self

    def init_weights(self):
        if self.pretrained_cfg is not None:
            load_pretrained(self, self.pretrained_cfg['checkpoint'],
                            self.pretrained_cfg.get('prefix'),
                            allow_non_finite=self.pretrained_cfg.get('allow_non_finite', False))
            self._is_init = True
            return
        if self.init_cfg is None:
            self.apply(self._init_module)
        super().init_weights()

    @staticmethod
    def _init_module(module: nn.Module):
        if isinstance(module, nn.Linear):
            trunc_normal_init(module, std=.02, bias=0.)
        elif isinstance(module, (nn.LayerNorm, _BatchNorm)):
            constant_init(module, val=1., bias=0.)
        elif isinstance(module, nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
            fan_out //= module.groups
            nn.init.normal_(module.weight, 0, math.sqrt(2.0 / fan_out))
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def _check_input(self, x: torch.Tensor):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f'{type(self).__name__} expects a B×C×H×W tensor, got {shape}')
        if x.shape[1] != self.in_channels:
            raise ValueError(f'{type(self).__name__} was built for {self.in_channels} input '
                             f'channels, got a tensor with {x.shape[1]} (shape {tuple(x.shape)})')
        if x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f'{type(self).__name__} takes images of any size from 1×1 up, '
                             f'got an empty one (shape {tuple(x.shape)})')

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Feature maps ``B×C_i×ceil(H/s_i)×ceil(W/s_i)`` for ``i`` in ``out_indices``,
        with strides ``s = (4, 8, 16, 32)``."""
        self._check_input(x)
        x = self.stem(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                out = getattr(self, f'norm{i}')(x)
                if self.norm_in_path:
                    x = out
                outs.append(_to_nchw(out).contiguous())
        return tuple(outs)


class ResT(_ResTBase):
    """ResT v1 backbone (`ResT: An Efficient Transformer for Visual Recognition
    <https://arxiv.org/abs/2105.13677>`_, NeurIPS 2021).

    Output norms follow the authors' detection release: a fresh LayerNorm on output
    stages 1–3, and on stage 4 the ImageNet model's final ``norm`` (loaded from the
    checkpoint as ``norm3``). In the authors' detectron2 backbone these norms sit in the
    main path (the next stage consumes the normalised map); ``norm_in_path=True`` builds
    that model, which their published detection results and released detectors need.

    Args:
        arch (str | dict): ``'lite'``, ``'small'``, ``'base'``, ``'large'`` or a dict with
            the keys ``embed_dims``, ``depths``, ``num_heads``, ``sr_ratios``,
            ``mlp_ratio``. Defaults to ``'small'``.
        in_channels (int): Input channels. Defaults to 3.
        out_indices (Sequence[int] | int): Stages to output, negative allowed.
            Defaults to ``(0, 1, 2, 3)``.
        qkv_bias (bool): Bias in the q and kv projections. Defaults to True.
        apply_transform (bool): Mix attention logits across heads and
            instance-normalise the attention map (stages with more than one head).
            Defaults to True.
        norm_in_path (bool): Whether each output stage's LayerNorm is applied to the map
            the next stage consumes (the authors' detectron2 backbone) rather than to a
            side branch that only feeds the output. Defaults to False.
        drop_rate (float): Dropout after MLP layers and projections, in [0, 1).
            Defaults to 0.
        attn_drop_rate (float): Dropout on the attention map, in [0, 1). Defaults to 0.
        drop_path_rate (float): Stochastic depth, linear over blocks, in [0, 1).
            Defaults to 0.
        frozen_stages (int): -1 freezes nothing, 0 the stem, ``N`` also stages
            ``1..N`` with their patch embeddings and output norms. Defaults to -1.
        norm_eval (bool): Keep BatchNorm layers in eval mode while training.
            Defaults to False.
        with_cp (bool): Activation checkpointing per block. Defaults to False.
        init_cfg (dict, optional): ``dict(type='Pretrained', checkpoint=PATH)`` loads
            an authors' or converted checkpoint strictly; weights holding NaN or Inf are
            refused unless it adds ``allow_non_finite=True``. Defaults to None.
        pretrained (str, optional): Deprecated (OpenMMLab's older argument, which mmseg's
            segmentors pass on from ``model.pretrained``): a checkpoint path or URL, taken
            as ``init_cfg=dict(type='Pretrained', checkpoint=pretrained)`` with a warning.
            Another zoo's model name (``open-mmlab://...``, ``torchvision://...``) is
            refused. Defaults to None.
    """

    fresh_norm_indices = (0, 1, 2)
    arch_zoo = ARCH_ZOOS['ResT']
    norm_eps = 1e-5

    def __init__(self,
                 arch: Union[str, dict] = 'small',
                 in_channels: int = 3,
                 out_indices: Union[int, Sequence[int]] = (0, 1, 2, 3),
                 qkv_bias: bool = True,
                 apply_transform: bool = True,
                 norm_in_path: bool = False,
                 drop_rate: float = 0.,
                 attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.,
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 init_cfg: Optional[dict] = None,
                 pretrained: Optional[str] = None):
        super().__init__(arch=arch, in_channels=in_channels, out_indices=out_indices,
                         drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                         drop_path_rate=drop_path_rate, frozen_stages=frozen_stages,
                         norm_eval=norm_eval, with_cp=with_cp, init_cfg=init_cfg,
                         pretrained=pretrained)
        self.norm_in_path = norm_in_path
        dims, a = self.embed_dims, self.arch
        self.stem = ResTStem(in_channels, dims[0])
        self._build_stages(
            lambda i: EMSA(dims[i], a['num_heads'][i], a['sr_ratios'][i], qkv_bias,
                           apply_transform, norm_eps=self.norm_eps, attn_drop=attn_drop_rate,
                           proj_drop=drop_rate),
            lambda i: ResTPatchEmbed(dims[i - 1], dims[i]), drop_rate)


class ResTV2(_ResTBase):
    """ResTv2 backbone (`ResT V2: Simpler, Faster and Stronger
    <https://arxiv.org/abs/2204.07366>`_, NeurIPS 2022).

    Output norms follow the authors' segmentation release: a fresh LayerNorm on every
    output stage; the ImageNet model's final ``norm`` and ``head`` are not used.

    Args:
        arch (str | dict): ``'tiny'``, ``'small'``, ``'base'``, ``'large'`` or a dict with
            the keys ``embed_dims``, ``depths``, ``num_heads``, ``sr_ratios``,
            ``mlp_ratio``. Defaults to ``'tiny'``.
        in_channels (int): Input channels. Defaults to 3.
        out_indices (Sequence[int] | int): Stages to output, negative allowed.
            Defaults to ``(0, 1, 2, 3)``.
        qkv_bias (bool): Bias in the q and kv projections. Defaults to True.
        drop_rate (float): Dropout after MLP layers and projections, in [0, 1).
            Defaults to 0.
        attn_drop_rate (float): Dropout on the attention map, in [0, 1). Defaults to 0.
        drop_path_rate (float): Stochastic depth, linear over blocks, in [0, 1).
            Defaults to 0.
        frozen_stages (int): -1 freezes nothing, 0 the stem, ``N`` also stages
            ``1..N`` with their patch embeddings and output norms. Defaults to -1.
        norm_eval (bool): Keep the stem's BatchNorm layers in eval mode while
            training. Defaults to False.
        with_cp (bool): Activation checkpointing per block. Defaults to False.
        init_cfg (dict, optional): ``dict(type='Pretrained', checkpoint=PATH)`` loads
            an authors' or converted checkpoint strictly; weights holding NaN or Inf are
            refused unless it adds ``allow_non_finite=True``. Defaults to None.
        pretrained (str, optional): Deprecated (OpenMMLab's older argument, which mmseg's
            segmentors pass on from ``model.pretrained``): a checkpoint path or URL, taken
            as ``init_cfg=dict(type='Pretrained', checkpoint=pretrained)`` with a warning.
            Another zoo's model name (``open-mmlab://...``, ``torchvision://...``) is
            refused. Defaults to None.
    """

    fresh_norm_indices = (0, 1, 2, 3)
    arch_zoo = ARCH_ZOOS['ResTV2']
    norm_eps = 1e-6

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 in_channels: int = 3,
                 out_indices: Union[int, Sequence[int]] = (0, 1, 2, 3),
                 qkv_bias: bool = True,
                 drop_rate: float = 0.,
                 attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.,
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 init_cfg: Optional[dict] = None,
                 pretrained: Optional[str] = None):
        super().__init__(arch=arch, in_channels=in_channels, out_indices=out_indices,
                         drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                         drop_path_rate=drop_path_rate, frozen_stages=frozen_stages,
                         norm_eval=norm_eval, with_cp=with_cp, init_cfg=init_cfg,
                         pretrained=pretrained)
        dims, a = self.embed_dims, self.arch
        self.stem = ResTV2Stem(in_channels, dims[0], self.norm_eps)
        self._build_stages(
            lambda i: UpsampledValueAttention(dims[i], a['num_heads'][i], a['sr_ratios'][i],
                                              qkv_bias, norm_eps=self.norm_eps,
                                              attn_drop=attn_drop_rate, proj_drop=drop_rate),
            lambda i: ResTV2PatchEmbed(dims[i - 1], dims[i], self.norm_eps), drop_rate)


BACKBONES = {'ResT': ResT, 'ResTV2': ResTV2}
