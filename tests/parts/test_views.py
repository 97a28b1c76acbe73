"""MLB-Seg's geometric views: flips exact and self-inverse, zooms invertible on the central region (an affine ramp
survives the round trip), coverage, mapping between views, padding fill, and the draws in 2D and 3D."""

from __future__ import annotations

import pytest
import torch

from nnunet_ssl.parts.views import MLB_VIEWS, View, covered_between, draw_views, map_between


def _ramp(spatial: tuple[int, ...], channels: int = 2) -> torch.Tensor:
    """An affine intensity ramp per channel: linear interpolation reproduces it exactly inside the patch."""
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in spatial], indexing="ij")
    ramp = sum((d + 1) * 0.5 * g for d, g in enumerate(grids)) + 3.0
    return torch.stack([ramp, -2 * ramp + 1]).unsqueeze(0).expand(2, channels, *spatial).clone()


def _interior(spatial: tuple[int, ...], margin: int) -> tuple[slice, ...]:
    return (slice(None), slice(None), *(slice(margin, n - margin) for n in spatial))


@pytest.mark.parametrize("spatial", [(12, 20, 16), (24, 20)])
def test_flip_is_exact_and_its_own_inverse(spatial):
    x = torch.randn(2, 3, *spatial)
    view = View("flip", axes=(0, len(spatial) - 1))
    y = view.forward(x)
    # by hand: the first and the last spatial axis reversed
    assert torch.equal(y, x.flip(2).flip(1 + len(spatial)))
    assert torch.equal(view.inverse(y), x) and torch.equal(view.forward(y), x)
    assert bool(view.coverage(spatial).all())
    identity = View("identity")
    assert identity.forward(x) is x and identity.inverse(x) is x


@pytest.mark.parametrize("spatial", [(12, 20, 16), (24, 20)])
@pytest.mark.parametrize("kind", ["zoom_in", "zoom_out"])
def test_zoom_round_trip_of_the_central_region(kind, spatial):
    margins = tuple(max(1, n // 8) for n in spatial)
    view = View(kind, margins=margins)
    x = _ramp(spatial)
    y = view.forward(x)
    assert y.shape == x.shape
    back = view.inverse(y)
    shown = view.coverage(spatial)
    if kind == "zoom_in":
        # the view shows the central n^2 / (n + 2p) voxels: the border of the original frame is not covered
        for d, (n, p) in enumerate(zip(spatial, margins)):
            centre: list = [m // 2 for m in spatial]
            centre[d] = slice(None)
            line = shown[(0, 0, *centre)]
            lost = n - round(n * n / (n + 2 * p))
            assert lost - 2 <= int((~line).sum()) <= lost + 2, (d, int((~line).sum()), lost)
    else:
        assert bool(shown.all())
    # an affine ramp comes back exactly on the covered voxels away from the outermost ones (interpolation clamps
    # at the patch border)
    interior = torch.zeros_like(shown)
    interior[_interior(spatial, max(margins) + 1)] = True
    inner = shown & interior
    assert int(inner.sum()) > 0
    assert torch.allclose(back[inner.expand_as(back)], x[inner.expand_as(x)], atol=1e-9)
    # and the other way round: view -> original -> view on the view's interior
    again = view.forward(view.inverse(y))
    keep = _interior(spatial, 2 * max(margins) + 1)
    assert torch.allclose(again[keep], y[keep], atol=1e-9)


def test_zoom_geometry_by_hand():
    # zoom-in by 2 of 8: resize to 12, keep 2..10; a ramp 0..7 becomes the centre of the resized ramp
    x = torch.arange(8, dtype=torch.float64).reshape(1, 1, 8, 1).expand(1, 1, 8, 3).clone()
    zin = View("zoom_in", margins=(2, 0))
    # voxel j of the view sits at (j + 2 + 0.5) * 8 / 12 - 0.5 in the original frame
    expected = torch.tensor([(j + 2.5) * 8 / 12 - 0.5 for j in range(8)], dtype=torch.float64)
    assert torch.allclose(zin.forward(x)[0, 0, :, 1], expected)
    # zoom-out by 2 of 8: the ramp squeezed into voxels 2..5, the border is fill
    zout = View("zoom_out", margins=(2, 0))
    y = zout.forward(x, fill=-1.0)
    assert torch.equal(y[0, 0, :2], torch.full((2, 3), -1.0, dtype=torch.float64))
    assert torch.equal(y[0, 0, 6:], torch.full((2, 3), -1.0, dtype=torch.float64))
    squeezed = torch.tensor([(j + 0.5) * 2 - 0.5 for j in range(4)], dtype=torch.float64)
    assert torch.allclose(y[0, 0, 2:6, 0], squeezed)
    # one fill value per channel (class probabilities padded with the background's one-hot vector)
    probs = torch.full((1, 3, 8, 3), 1 / 3)
    padded = zout.forward(probs, fill=[1.0, 0.0, 0.0])
    assert torch.equal(padded[0, :, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(padded[0, :, 4, 1], torch.full((3,), 1 / 3))


def test_mapping_between_views_and_its_coverage():
    spatial = (16, 16)
    x = _ramp(spatial)
    zin, zout = View("zoom_in", margins=(2, 2)), View("zoom_out", margins=(3, 3))
    flip = View("flip", axes=(1,))
    # a flip to a flip is the identity; identity to a view is the view's forward
    assert torch.equal(map_between(flip.forward(x), flip, flip), flip.forward(x))
    assert torch.equal(map_between(x, View("identity"), zout), zout.forward(x))
    # zoom-out -> zoom-in: the whole zoom-in frame is shown by the zoom-out view; the reverse leaves the
    # zoom-out's padding and the zoom-in's lost border uncovered
    assert bool(covered_between(zout, zin, spatial).all())
    back = covered_between(zin, zout, spatial)
    assert not bool(back[..., 0, :].any()) and bool(back[..., 8, 8])
    mapped = map_between(zout.forward(x), zout, zin)
    inner = (slice(None), slice(None), slice(3, 13), slice(3, 13))
    assert torch.allclose(mapped[inner], zin.forward(x)[inner], atol=1e-9)


def test_draws_in_2d_and_3d():
    g = torch.Generator().manual_seed(0)
    for spatial in [(16, 32, 32), (64, 48), (1, 40, 40)]:
        for _ in range(20):
            views = draw_views(MLB_VIEWS, spatial, (4 / 144, 30 / 144), generator=g)
            assert [v.kind for v in views] == list(MLB_VIEWS)
            for v in views[1:4]:
                assert all(round(4 / 144 * n) <= p <= round(30 / 144 * n) for p, n in zip(v.margins, spatial))
                assert all(n - 2 * p >= 1 for p, n in zip(v.margins, spatial)) or v.kind == "zoom_in"
            flip = views[4]
            assert flip.axes and all(spatial[a] > 1 for a in flip.axes)
    # every non-empty set of the 3 axes shows up in 3D; a zoom-out keeps a voxel of a thin axis
    seen = {draw_views(("flip",), (8, 8, 8), generator=g)[0].axes for _ in range(200)}
    assert seen == {(0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)}
    (thin,) = draw_views(("zoom_out",), (3, 40), (0.4, 0.45), generator=g)
    assert thin.margins[0] == 1 and thin.forward(torch.ones(1, 1, 3, 40)).shape == (1, 1, 3, 40)
    with pytest.raises(ValueError, match="zoom_range"):
        draw_views(MLB_VIEWS, (8, 8), (0.1, 0.6))
    with pytest.raises(ValueError, match="unknown view"):
        View("rotate")
