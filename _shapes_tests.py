"""Tests of shapes.py against the contract in SHAPES.md.

    python -m pytest -q _shapes_tests.py

The constraint checks below restate SHAPES.md's rules independently of shapes.py's
helpers (without its safety margins), so they test the contract, not the code.
"""

import re

import numpy as np

import shapes

COLOR = "(red|yellow|green|cyan|blue|purple)"
SHAPE = "(circle|square|triangle)"
GRAMMAR = {  # template number -> full-caption regex
    1: rf"a {COLOR} {SHAPE}",
    2: rf"a (small|large) {COLOR} {SHAPE}",
    3: rf"a {COLOR} {SHAPE} (on the left|on the right|at the top|at the bottom|in the center)",
    4: rf"a {COLOR} {SHAPE} (to the left of|to the right of|above|below) a {COLOR} {SHAPE}",
    5: rf"(two|three) {COLOR} {SHAPE}s",
}


def _scenes(n=300, seed=0):
    rng = np.random.default_rng(seed)
    return [shapes.sample_scene(rng) for _ in range(n)]


def _template_of(caption):
    matches = [t for t, pattern in GRAMMAR.items() if re.fullmatch(pattern, caption)]
    assert len(matches) == 1, (caption, matches)
    return matches[0]


def test_palette_and_vocabulary():
    assert shapes.PALETTE == {
        "red": (220, 40, 40),
        "yellow": (230, 200, 30),
        "green": (40, 170, 60),
        "cyan": (30, 190, 200),
        "blue": (40, 70, 220),
        "purple": (160, 50, 200),
    }
    assert list(shapes.PALETTE) == ["red", "yellow", "green", "cyan", "blue", "purple"]
    assert shapes.SHAPES == ("circle", "square", "triangle")
    assert shapes.SIZES == {"small": 0.18, "large": 0.36, None: 0.26}
    assert shapes.COUNTS == {"two": 2, "three": 3}


def test_captions_follow_the_five_templates():
    seen = {_template_of(caption) for caption, _ in _scenes()}
    assert seen == {1, 2, 3, 4, 5}
    rng = np.random.default_rng(1)
    for t in GRAMMAR:
        for _ in range(20):
            caption, _ = shapes.sample_scene(rng, template=t)
            assert re.fullmatch(GRAMMAR[t], caption), (t, caption)
            assert caption == caption.lower() and "  " not in caption
            assert type(caption) is str


def test_scenes_satisfy_the_contract():
    for caption, objects in _scenes():
        t = _template_of(caption)
        words = re.fullmatch(GRAMMAR[t], caption).groups()
        for o in objects:  # inside the border, size near its nominal value
            half = o["size"] / 2
            assert 0.04 <= o["cx"] - half and o["cx"] + half <= 0.96, (caption, o)
            assert 0.04 <= o["cy"] - half and o["cy"] + half <= 0.96, (caption, o)
            nominal = shapes.SIZES[words[0] if t == 2 else None]
            assert 0.9 * nominal - 1e-9 <= o["size"] <= 1.1 * nominal + 1e-9, (caption, o)
        for i, a in enumerate(objects):  # bounding boxes at least 0.04 apart
            for b in objects[i + 1 :]:
                reach = (a["size"] + b["size"]) / 2 + 0.04
                assert abs(a["cx"] - b["cx"]) >= reach or abs(a["cy"] - b["cy"]) >= reach

        if t in (1, 2, 3):
            (o,) = objects
            color, shape = words[-3:-1] if t == 3 else words[-2:]
            assert (o["color"], o["shape"]) == (color, shape)
        if t == 3:
            x, y = objects[0]["cx"], objects[0]["cy"]
            rule = {
                "on the left": x < 1 / 3,
                "on the right": x > 2 / 3,
                "at the top": y < 1 / 3,
                "at the bottom": y > 2 / 3,
                "in the center": 1 / 3 <= x <= 2 / 3 and 1 / 3 <= y <= 2 / 3,
            }
            assert rule[words[2]], (caption, objects)
        if t == 4:
            color1, shape1, relation, color2, shape2 = words
            a, b = objects
            assert (a["color"], a["shape"], b["color"], b["shape"]) == (color1, shape1, color2, shape2)
            assert color1 != color2
            dx, dy = b["cx"] - a["cx"], b["cy"] - a["cy"]  # y grows downward
            rule = {
                "to the left of": dx >= 0.2 and abs(dx) > abs(dy),
                "to the right of": -dx >= 0.2 and abs(dx) > abs(dy),
                "above": dy >= 0.2 and abs(dy) > abs(dx),
                "below": -dy >= 0.2 and abs(dy) > abs(dx),
            }
            assert rule[relation], (caption, objects)
        if t == 5:
            count, color, shape = words
            assert len(objects) == shapes.COUNTS[count]
            assert {(o["color"], o["shape"], o["size"]) for o in objects} == {(color, shape, objects[0]["size"])}
        else:
            assert len(objects) == (2 if t == 4 else 1)


def test_render_is_white_plus_exact_palette_shapes():
    allowed = np.array([(255, 255, 255), *shapes.PALETTE.values()], np.uint8)  # (7, 3)
    for S in (32, 64):
        for _, objects in _scenes(n=100, seed=S):
            image = shapes.render(objects, S)
            assert image.shape == (S, S, 3) and image.dtype == np.uint8
            covered = np.zeros((S, S), bool)
            for o in objects:
                # The contract's bounding box on the pixel grid (right/bottom exclusive).
                x0, x1 = round((o["cx"] - o["size"] / 2) * S), round((o["cx"] + o["size"] / 2) * S)
                y0, y1 = round((o["cy"] - o["size"] / 2) * S), round((o["cy"] + o["size"] / 2) * S)
                patch = image[y0:y1, x0:x1]
                mine = (patch == shapes.PALETTE[o["color"]]).all(-1)
                white = (patch == 255).all(-1)
                assert (mine | white).all()  # boxes are disjoint: nothing else inside
                # The shape spans its whole box, so a checker reads back the right size.
                assert mine.any(0).all() and mine.any(1).all()
                assert mine.sum() >= 9  # visible even when small at S=32
                covered[y0:y1, x0:x1] = True
            assert (image[~covered] == 255).all()  # white outside every object
            # Every pixel is white or exactly a palette colour: no blending, no noise.
            assert (image[:, :, None, :] == allowed).all(-1).any(-1).all()


def test_shape_fill_ratios():
    # What the checker uses to tell shapes apart: fill of the bounding box.
    S = 64
    for shape, lo, hi in (("square", 0.99, 1.0), ("circle", 0.7, 0.88), ("triangle", 0.4, 0.65)):
        obj = dict(shape=shape, color="blue", cx=0.5, cy=0.5, size=0.26)
        mask = (shapes.render([obj], S) != 255).any(-1)
        ys, xs = np.nonzero(mask)
        fill = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
        assert lo <= fill <= hi, (shape, fill)


def test_shapes_batch_is_deterministic_and_sliceable():
    images, captions = shapes.shapes_batch(seed=3, step=7, batch_size=8, resolution=32)
    assert images.shape == (8, 32, 32, 3) and images.dtype == np.uint8 and len(captions) == 8
    again, captions_again = shapes.shapes_batch(seed=3, step=7, batch_size=8, resolution=32)
    np.testing.assert_array_equal(images, again)
    assert captions == captions_again
    part, part_captions = shapes.shapes_batch(seed=3, step=7, batch_size=8, resolution=32, start=3, stop=6)
    np.testing.assert_array_equal(part, images[3:6])
    assert part_captions == captions[3:6]
    _, other_step = shapes.shapes_batch(seed=3, step=8, batch_size=8, resolution=32)
    _, other_seed = shapes.shapes_batch(seed=4, step=7, batch_size=8, resolution=32)
    assert other_step != captions and other_seed != captions
