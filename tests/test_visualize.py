"""Rank grids (``reid_aug.visualize``) and ``reid-aug visualize-ranks``."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from reid_aug.cli import main
from reid_aug.visualize import BACKGROUND, GREEN, QUERY_BORDER, RED, pick_queries, rank_grid


def _border_runs(grid: Image.Image, y: int) -> list[tuple[int, tuple[int, int, int]]]:
    """(start x, colour) of each stretch of non-background pixels along row ``y`` (a frame's top border)."""
    row = [grid.getpixel((x, y)) for x in range(grid.width)]
    return [(x, c) for x, c in enumerate(row) if c != BACKGROUND and (x == 0 or row[x - 1] != c)]


@pytest.fixture
def solid_images(tmp_path):
    """Six one-colour images; the colour tells which one a cell shows."""
    colours = [(10 * i + 5, 100, 200 - 10 * i) for i in range(6)]
    paths = []
    for i, c in enumerate(colours):
        paths.append(tmp_path / f"img{i}.png")
        Image.new("RGB", (6, 12), c).save(paths[-1])
    return paths, colours


def test_rank_grid_borders_follow_the_protocol(solid_images):
    paths, colours = solid_images
    # Query 0: pid 3, camera 0. Gallery by distance: pid 3 in camera 0 (skipped: same camera),
    # junk -1 (skipped), distractor 0 (shown, red), pid 3 in camera 1 (green), pid 5 (red).
    g_pids, g_cams = [3, -1, 0, 3, 5], [0, 1, 2, 1, 1]
    distmat = np.array([[0.1, 0.2, 0.3, 0.4, 0.5], [0.5, 0.4, 0.3, 0.2, 0.1]])
    gap, border, cell = 1, 2, (12, 6)
    grid = rank_grid(distmat, [3, 5], g_pids, [0, 0], g_cams, paths[:1] * 2, paths[1:], [0], topk=4,
                     cell=cell, border=border, gap=gap)
    cell_w, cell_h = cell[1] + 2 * border, cell[0] + 2 * border
    assert grid.height == 2 * gap + cell_h
    runs = _border_runs(grid, gap)
    # Query, then three gallery cells; the fourth stays blank (only three valid gallery images).
    assert [c for _, c in runs] == [QUERY_BORDER, RED, GREEN, RED]
    assert grid.width - (runs[-1][0] + cell_w) == 2 * gap + cell_w
    # The cells show the right images: query, distractor (gallery 2), match (3), pid 5 (4).
    centres = [grid.getpixel((x + cell_w // 2, gap + cell_h // 2)) for x, _ in runs]
    assert centres == [colours[0], colours[3], colours[4], colours[5]]
    # Left and bottom borders are coloured too.
    assert all(grid.getpixel((x, gap + cell_h - 1)) == c for x, c in runs)

    # Two rows, in the order given; the second query (pid 5, camera 0) ranks its match first.
    two = rank_grid(distmat, [3, 5], g_pids, [0, 0], g_cams, paths[:1] * 2, paths[1:], [1, 0], topk=2,
                    cell=cell, border=border, gap=gap)
    assert [c for _, c in _border_runs(two, gap)] == [QUERY_BORDER, GREEN, RED]
    assert [c for _, c in _border_runs(two, 2 * gap + cell_h)] == [QUERY_BORDER, RED, GREEN]


def test_rank_grid_bad_input(solid_images, tmp_path):
    paths, _ = solid_images
    args = (np.zeros((1, 2)), [1], [1, 2], [0], [1, 1])
    with pytest.raises(FileNotFoundError, match="gone.png"):
        rank_grid(*args, paths[:1], [paths[1], tmp_path / "gone.png"], [0])
    with pytest.raises(ValueError, match="g_paths"):
        rank_grid(*args, paths[:1], paths[:1], [0])
    with pytest.raises(ValueError, match="query_indices"):
        rank_grid(*args, paths[:1], paths[:2], [1])


def test_pick_queries_seeded_and_valid_only():
    q_pids, q_cams = np.arange(1, 21), np.zeros(20, int)
    g_pids, g_cams = np.arange(1, 21), np.r_[np.ones(15, int), np.zeros(5, int)]  # ids 16-20: same camera only
    a = pick_queries(q_pids, g_pids, q_cams, g_cams, 5, seed=1)
    assert a.tolist() == pick_queries(q_pids, g_pids, q_cams, g_cams, 5, seed=1).tolist()
    assert len(set(a.tolist())) == 5 and a.max() < 15 and list(a) == sorted(a)
    assert pick_queries(q_pids, g_pids, q_cams, g_cams, 100).tolist() == list(range(15))
    with pytest.raises(ValueError, match="no query has a correct match"):
        pick_queries(q_pids[15:], g_pids, q_cams[15:], g_cams, 3)


def test_visualize_ranks_cli(tiny_model_and_market, tmp_path):
    folder, market = tiny_model_and_market
    feats = tmp_path / "feats.npz"
    runner = CliRunner()
    result = runner.invoke(main, ["evaluate", "--model", str(folder), "--data", str(market), "--out", str(tmp_path),
                                  "--device", "cpu", "--save-features", str(feats)])
    assert result.exit_code == 0, result.output

    from_file = tmp_path / "from_file.png"
    result = runner.invoke(main, ["visualize-ranks", "--features", str(feats), "--data", str(market),
                                  "--out", str(from_file), "--num-queries", "3", "--topk", "4"])
    assert result.exit_code == 0, result.output
    from_model = tmp_path / "from_model.png"
    result = runner.invoke(main, ["visualize-ranks", "--model", str(folder), "--data", str(market),
                                  "--out", str(from_model), "--num-queries", "3", "--topk", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "3 queries x top-4" in result.output
    # Same features, same seeded queries: the same picture either way.
    a, b = Image.open(from_file), Image.open(from_model)
    assert a.size == b.size
    assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("args, message", [
    (["--features", "{tmp}/absent.npz"], "Error: features file not found: {tmp}/absent.npz"),
    (["--features", "{tmp}/other.npz"], "q_names vs {tmp}/market: 1 of 1 image names not in the dataset, e.g. 'x.jpg'"),
    ([], "exactly one of --model DIR or --features FILE"),
])
def test_visualize_ranks_cli_errors(tmp_path, args, message):
    from reid_aug.data.toy import make_toy_market
    from reid_aug.evaluate import save_features

    market = make_toy_market(tmp_path / "market", num_ids=3, images_per_id=(2, 2), seed=0)
    save_features(tmp_path / "other.npz", {
        "q_feats": np.ones((1, 2), np.float32), "g_feats": np.ones((1, 2), np.float32), "q_pids": [1],
        "g_pids": [1], "q_camids": [0], "g_camids": [1], "q_names": ["x.jpg"], "g_names": ["y.jpg"]})
    args = [a.format(tmp=tmp_path) for a in args]
    out = tmp_path / "o.png"
    result = CliRunner().invoke(main, ["visualize-ranks", *args, "--data", str(market), "--out", str(out)])
    assert result.exit_code != 0 and message.format(tmp=tmp_path) in result.output
    if args:  # bad input files: one line naming the problem, no traceback
        assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()
