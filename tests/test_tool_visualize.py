"""tools/visualize.py: the attention maps it draws reproduce the attention's output, the
captured maps match a hook-free forward, clear errors; run as a user would (slow), a
readable figure of an odd-sized image."""
import sys

import mmcv
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rest_mm import ResTV2
from rest_mm.cli import export_onnx as export_tool
from rest_mm.cli import visualize as visualize_tool

from testlib import (
    REFERENCE_BY_NAME,
    TOOLS_DIR,
    reference_config,
    reference_model,
    run,
    write_image,
)


@pytest.mark.parametrize('name', sorted(REFERENCE_BY_NAME))
def test_attention_maps_reproduce_the_attention_output(name, reference_dir, reference_arch):
    """The probabilities the figure shows, applied to the values as the model does, give
    the attention module's own output: they are the model's attention, not a lookalike.
    In float64, where rounding cannot hide a difference (v1's instance norm amplifies
    float32 rounding by a machine-dependent amount)."""
    model = reference_model(name).double()
    torch.manual_seed(1)
    for stage_index, (h, w) in enumerate([(13, 21), (7, 11), (4, 6), (2, 3)]):
        attn = model.stages[stage_index].blocks[0].attn
        x = torch.randn(2, h, w, model.embed_dims[stage_index], dtype=torch.float64)
        with torch.no_grad():
            probs, (hr, wr) = visualize_tool.attention_probabilities(attn, x)
            _, _, v, _ = attn.query_key_value(x)
            out = probs @ v
            if getattr(attn, 'apply_transform', False):
                # v1's instance norm over each head's map, after the softmax.
                mean = probs.mean(dim=(-2, -1), keepdim=True)
                var = probs.var(dim=(-2, -1), correction=0, keepdim=True)
                out = ((probs - mean) @ v) * torch.rsqrt(var + 1e-5)
            merged = out.transpose(1, 2).reshape(2, h, w, -1)
            if isinstance(model, ResTV2):
                merged = merged + attn.upsample_values(v, (hr, wr), (h, w))
            expected = attn(x)
        assert (hr, wr) == (-(-h // attn.sr_ratio), -(-w // attn.sr_ratio))
        assert probs.shape == (2, attn.num_heads, h * w, hr * wr)
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, attn.num_heads, h * w,
                                                             dtype=torch.float64))
        torch.testing.assert_close(attn.proj(merged), expected, atol=1e-10, rtol=1e-10)
        # One query alone is the same row of the full map.
        single, _ = visualize_tool.attention_probabilities(attn, x, query_index=5)
        torch.testing.assert_close(single[:, :, 0], probs[:, :, 5])


@pytest.mark.parametrize('name', ['v1', 'v2'])
def test_inspect_captures_the_right_maps(name, reference_dir, reference_arch):
    """Energy, gate and attention at an odd input size equal a hook-free recomputation,
    stage by stage, at the maps' own ``ceil(H / stride)`` sizes."""
    model = reference_model(name)
    height, width = 203, 317
    image = torch.randn(1, 3, height, width)
    query = (250, 30)
    stages = visualize_tool.inspect(model, image, query)

    with torch.no_grad():
        x = image
        for i, stage in enumerate(model.stages):
            if i == 0:
                stem = model.stem
                pa_input = (stem.proj(x) if name == 'v2' else
                            stem.conv3(F.relu(stem.norm2(stem.conv2(
                                F.relu(stem.norm1(stem.conv1(x))))))))
                block_input = x = model.stem(x)  # stage 1 has no downsampling of its own
            else:
                down = stage.downsample
                nchw = x.permute(0, 3, 1, 2)
                pa_input = down.proj(nchw) if name == 'v2' else down.norm(down.conv(nchw))
                block_input = down(x)
            x = stage(x)
            stride = 4 * 2 ** i
            h, w = -(-height // stride), -(-width // stride)
            row, col = query[1] // stride, query[0] // stride
            captured = stages[i]
            assert captured['energy'].shape == captured['gate'].shape == (h, w)
            np.testing.assert_allclose(captured['energy'], x[0].norm(dim=-1).numpy(), rtol=1e-5)
            gate = torch.sigmoid(stage.downsample.pos.pa_conv(pa_input) if i else
                                 model.stem.pos.pa_conv(pa_input))
            np.testing.assert_allclose(captured['gate'], gate[0].mean(0).numpy(), atol=1e-6)
            assert 0 < captured['gate'].min() and captured['gate'].max() < 1
            block = stage.blocks[0]
            probs, (hr, wr) = visualize_tool.attention_probabilities(block.attn,
                                                                     block.norm1(block_input))
            assert captured['query'] == (row, col)
            assert captured['attention'].shape == (hr, wr)
            np.testing.assert_allclose(captured['attention'],
                                       probs[0, :, row * w + col].mean(0).view(hr, wr).numpy(),
                                       atol=1e-6)
            assert captured['attention'].sum() == pytest.approx(1, abs=1e-5)


def test_visualize_rejects_bad_requests(tmp_path):
    image = tmp_path / 'odd.png'
    write_image(image, 61, 93)
    cases = [
        ([str(image), 'rest_small', '--out', str(tmp_path / 'x.jpg')], 'name a .png file'),
        ([str(image), 'rest_small', '--out', str(tmp_path / 'x.png'), '--query', '93', '0'],
         'outside the 93×61 image'),
        ([str(image), 'rest_medium', '--out', str(tmp_path / 'x.png')],
         'neither a config file nor a preset name'),
        ([str(tmp_path / 'missing.png'), 'rest_small', '--out', str(tmp_path / 'x.png')],
         'could not be read'),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=message):
            visualize_tool.main(argv)


def test_visualize_and_export_never_write_over_inputs(tmp_path):
    image = tmp_path / 'photo.png'
    write_image(image, 33, 47)
    with pytest.raises(SystemExit, match='--out .* the output is the image'):
        visualize_tool.main([str(image), 'rest_small', '--out', str(image)])
    weights = tmp_path / 'weights.onnx'
    weights.write_bytes(b'not really')
    with pytest.raises(SystemExit, match='--out .* the output is the checkpoint'):
        export_tool.main(['rest_small', str(weights), '--out', str(weights)])
    assert weights.read_bytes() == b'not really'


@pytest.mark.slow
@pytest.mark.parametrize('variant', ['rest_small', 'reference_v2_with_checkpoint'])
def test_visualize_writes_a_readable_figure(tmp_path, variant, reference_dir, reference_arch):
    image = tmp_path / 'odd.png'
    write_image(image, 203, 317)
    out = tmp_path / 'figure.png'
    if variant == 'rest_small':
        args = ['rest_small']
    else:
        args = [reference_config(tmp_path, 'v2', reference_arch),
                reference_dir / 'rest_v2_tiny.pt']
    stdout = run([sys.executable, TOOLS_DIR / 'visualize.py', image, *args, '--out', out,
                  '--query', 250, 30], cwd=tmp_path, timeout=900).stdout
    assert 'input 317×203' in stdout
    figure = mmcv.imread(str(out))
    assert figure is not None and figure.shape[0] > 600 and figure.shape[1] > 1000
    # Not blank: the overlays and text vary across the figure.
    assert figure.std() > 20


# --- thin images (issue 16) ---------------------------------------------------------------
@pytest.mark.parametrize('max_size, valid, invalid', [
    (100, (299, 4), (0, 5)),    # 300×5 shown as 100×2: Y=5 was taken (read back as 6 rows)
    (77, (0, 4), (300, 0)),     # 300×5 shown as 77×1: Y=4 was refused (read back as 4 rows)
    (1024, (299, 4), (0, 5)),
])
def test_visualize_query_is_checked_against_the_original_thin_image(tmp_path, monkeypatch,
                                                                    capsys, max_size, valid,
                                                                    invalid):
    image = tmp_path / 'thin.png'
    write_image(image, 5, 300)
    drawn = []
    monkeypatch.setattr(visualize_tool, 'draw', lambda image, stages, query, *args:
                        drawn.append((image.shape[:2], query)))
    argv = [str(image), 'rest_lite', '--out', str(tmp_path / 'x.png'), '--max-size',
            str(max_size), '--query']
    visualize_tool.main(argv + [str(q) for q in valid])
    (height, width), query = drawn[0]
    assert 0 <= query[0] < width and 0 <= query[1] < height
    with pytest.raises(SystemExit) as refused:
        visualize_tool.main(argv + [str(q) for q in invalid])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert err == (f'tools/visualize.py: error: --query {invalid[0]} {invalid[1]} lies outside '
                   'the 300×5 image (X in 0..299, Y in 0..4)\n')


def test_visualize_query_maps_each_side_by_its_own_factor():
    # 4000×5 shrinks to 1024×1: the last pixel stays the last one on both sides.
    assert visualize_tool.query_in_image((3999, 4), (4000, 5), (1024, 1)) == (1023, 0)
    assert visualize_tool.query_in_image(None, (4000, 5), (1024, 1)) == (512, 0)


@pytest.mark.parametrize('height, width', [(300, 5), (5, 4000)])
def test_visualize_figure_of_a_thin_image_stays_small(tmp_path, height, width):
    # The figure's height grew with the aspect ratio: 5×300 gave a 1408×63492 px PNG (1.4 GB
    # in memory) and 4000-tall images ran for minutes.
    image = tmp_path / 'thin.png'
    write_image(image, height, width)
    out = tmp_path / 'figure.png'
    visualize_tool.main([str(image), 'rest_lite', '--out', str(out)])
    figure = mmcv.imread(str(out))
    panel_px = visualize_tool.PANEL * 110  # the figure's dpi
    rows, columns = 3, 4
    assert figure.shape[1] <= columns * panel_px + 1
    assert figure.shape[0] <= (rows * visualize_tool.MAX_PANEL_ASPECT * panel_px
                               + 1.2 * 110 + 1)
