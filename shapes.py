"""Shapes world: the built-in procedural text-to-image data set.

Muse's claims about what its text conditioning buys (colour binding, cardinality,
spatial relations) need captions whose truth can be checked on the image. This file
draws such pairs with no download: a caption from one of five templates, the objects it
describes, and a flat-colour rendering. The project's SHAPES.md (summarised in README.md) is the contract (palette,
sizes, templates, geometric rules) that the evaluation's image checker relies on; this
file implements it and must not drift from it.

    caption, objects = sample_scene(np.random.default_rng(0))   # one scene
    image = render(objects, resolution=64)                      # uint8 (64, 64, 3)
    images, captions = shapes_batch(seed, step, batch_size=256, resolution=64)

`train.py --data shapes` calls `shapes_batch`, which is a pure function of (seed, step),
so a resumed run sees the same batches, and each host of a multi-host job renders only
its own rows [start, stop) of the global batch.

Coordinates are fractions of the side S with (0, 0) top-left and y growing downward, so
"above" means a smaller cy. Each object is a dict
{"shape", "color", "cx", "cy", "size"}: bounding-box centre and side, as fractions of S.
"""

import numpy as np
from PIL import Image, ImageDraw

# The contract's vocabulary, in the order SHAPES.md lists it.
PALETTE = {
    "red": (220, 40, 40),
    "yellow": (230, 200, 30),
    "green": (40, 170, 60),
    "cyan": (30, 190, 200),
    "blue": (40, 70, 220),
    "purple": (160, 50, 200),
}
COLORS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.18, "large": 0.36, None: 0.26}  # None: the caption names no size
POSITIONS = ("on the left", "on the right", "at the top", "at the bottom", "in the center")
RELATIONS = ("to the left of", "to the right of", "above", "below")
COUNTS = {"two": 2, "three": 3}
TEMPLATES = 5  # numbered 1..5 as in SHAPES.md

BORDER = 0.04  # every object lies inside [BORDER, 1 - BORDER] ...
GAP = 0.04  # ... and at least GAP away from every other object
SIZE_JITTER = 0.10  # each size varies by up to ±10%
MIN_SHIFT = 0.2  # relations: the centres differ by at least this along the named axis
# Position and relation rules are stated on exact centres, but a checker reads centres
# off integer pixels (off by up to half a pixel, 1/64 of S at S=32). Keeping the
# training scenes this far inside each rule means the rendered image satisfies the
# caption too, not just the float coordinates behind it.
MARGIN = 0.02
PLACEMENT_TRIES = 200  # positions tried per caption before drawing a new caption


def _pick(rng, options):
    # Index instead of rng.choice so we get plain Python str, not numpy.str_.
    return options[int(rng.integers(len(options)))]


def _jitter(rng, size):
    return float(size * rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER))


def _position_ok(position, cx, cy):
    lo, hi = 1 / 3 - MARGIN, 2 / 3 + MARGIN  # outside the middle third, with margin
    if position == "on the left":
        return cx < lo
    if position == "on the right":
        return cx > hi
    if position == "at the top":
        return cy < lo
    if position == "at the bottom":
        return cy > hi
    # "in the center": both coordinates inside the middle third, with margin.
    return all(1 / 3 + MARGIN <= c <= 2 / 3 - MARGIN for c in (cx, cy))


def _relation_ok(relation, a, b):
    """Whether object a stands in `relation` to object b ("a A {relation} a B")."""
    dx, dy = b["cx"] - a["cx"], b["cy"] - a["cy"]  # from A to B; y grows downward
    if relation in ("above", "below"):
        dx, dy = dy, dx  # same rule with the axes swapped
    # "left of" / "above": B lies further along the axis (positive shift); "right of" /
    # "below": A does, i.e. the shift is negative.
    shift = dx if relation in ("to the left of", "above") else -dx
    return shift >= MIN_SHIFT + MARGIN and abs(dx) > abs(dy) + MARGIN


def _apart(a, b):
    """Bounding boxes grown by GAP do not touch: separated along x or along y.

    Conservative: a gap between the boxes is a gap between the shapes inside them.
    """
    reach = (a["size"] + b["size"]) / 2 + GAP
    return abs(a["cx"] - b["cx"]) >= reach or abs(a["cy"] - b["cy"]) >= reach


def _draw_caption(rng, template):
    """A caption, the objects it names (without positions) and the rule their
    positions must obey."""
    color, shape = _pick(rng, COLORS), _pick(rng, SHAPES)
    default = SIZES[None]
    if template == 1:  # "a {color} {shape}", anywhere
        objects = [dict(shape=shape, color=color, size=_jitter(rng, default))]
        return f"a {color} {shape}", objects, lambda objs: True
    if template == 2:  # "a {size} {color} {shape}"
        size = _pick(rng, ("small", "large"))
        objects = [dict(shape=shape, color=color, size=_jitter(rng, SIZES[size]))]
        return f"a {size} {color} {shape}", objects, lambda objs: True
    if template == 3:  # "a {color} {shape} {position}"
        position = _pick(rng, POSITIONS)
        objects = [dict(shape=shape, color=color, size=_jitter(rng, default))]
        rule = lambda objs: _position_ok(position, objs[0]["cx"], objs[0]["cy"])
        return f"a {color} {shape} {position}", objects, rule
    if template == 4:  # "a {color1} {shape1} {relation} a {color2} {shape2}"
        # Two different colours, so the caption's binding of colour to shape is
        # what tells the objects apart; the shapes may repeat.
        i, j = rng.choice(len(COLORS), size=2, replace=False)
        color1, color2 = COLORS[int(i)], COLORS[int(j)]
        shape2 = _pick(rng, SHAPES)
        relation = _pick(rng, RELATIONS)
        objects = [
            dict(shape=shape, color=color1, size=_jitter(rng, default)),
            dict(shape=shape2, color=color2, size=_jitter(rng, default)),
        ]
        rule = lambda objs: _relation_ok(relation, objs[0], objs[1])
        return f"a {color1} {shape} {relation} a {color2} {shape2}", objects, rule
    if template == 5:  # "{count} {color} {shape}s": one colour, one shape, one size
        count = _pick(rng, tuple(COUNTS))
        size = _jitter(rng, default)
        objects = [dict(shape=shape, color=color, size=size) for _ in range(COUNTS[count])]
        return f"{count} {color} {shape}s", objects, lambda objs: True
    raise ValueError(f"template must be in 1..{TEMPLATES}, got {template}")


def _place(rng, objects, rule):
    """Rejection-sample centres: every object inside the border, all pairs apart, `rule`
    satisfied. Returns the objects with cx, cy filled in, or None if no try succeeded."""
    for _ in range(PLACEMENT_TRIES):
        placed = []
        for obj in objects:
            # Uniform over the centres that keep this object inside the border.
            lo, hi = BORDER + obj["size"] / 2, 1 - BORDER - obj["size"] / 2
            cx, cy = rng.uniform(lo, hi, size=2)
            placed.append(dict(obj, cx=float(cx), cy=float(cy)))
        separated = all(_apart(a, b) for k, a in enumerate(placed) for b in placed[k + 1 :])
        if separated and rule(placed):
            return placed
    return None


def parse_holdout(text: str) -> tuple:
    """'purple triangle, yellow square' (train.py --holdout) -> ("purple triangle", "yellow square")."""
    return tuple(pair.strip() for pair in text.split(",") if pair.strip())


def held_out(template: int, objects: list[dict], holdout) -> bool:
    """Whether a scene uses a (colour, shape) pair that training keeps out of relations.

    holdout: pairs such as {"purple triangle", "yellow square"}. Only template 4 (two
    objects in a relation) is held out, so the model still sees these objects on their
    own and must compose them into relations it never saw (a check of generalisation).
    """
    return template == 4 and any(f"{o['color']} {o['shape']}" in holdout for o in objects)


def sample_scene(rng: np.random.Generator, template: int | None = None,
                 holdout=()) -> tuple[str, list[dict]]:
    """Draw a caption and the objects it describes (see the module docstring).

    template: 1..5 as in SHAPES.md, or None for uniform over the five. holdout: see
    `held_out`; such scenes are redrawn (keeping the template).
    """
    if template is None:
        template = int(rng.integers(1, TEMPLATES + 1))
    while True:
        caption, objects, rule = _draw_caption(rng, template)
        if held_out(template, objects, holdout):
            continue
        placed = _place(rng, objects, rule)
        # A caption whose objects found no room (e.g. three large-ish objects with
        # unlucky draws) is redrawn rather than rendered with a constraint broken.
        if placed is not None:
            return caption, placed


def _pixel_box(obj, S):
    """Inclusive integer pixel box (x0, y0, x1, y1) of an object's bounding box.

    Edges are rounded to the pixel grid, and the right/bottom edge is exclusive in
    continuous coordinates, hence the -1: a box of side 0.25 at S=32 covers 8 pixels.
    """
    half = obj["size"] / 2
    x0, y0 = round((obj["cx"] - half) * S), round((obj["cy"] - half) * S)
    x1, y1 = round((obj["cx"] + half) * S) - 1, round((obj["cy"] + half) * S) - 1
    return x0, y0, x1, y1


def render(objects: list[dict], resolution: int) -> np.ndarray:
    """uint8 (S, S, 3) image: white background, each object in its flat palette colour.

    Drawn directly at resolution S with no anti-aliasing, so every non-white pixel is
    exactly a palette colour (the checker's colour blobs are then unambiguous). Each
    shape spans its pixel box exactly: small shapes stay visible at S=32 (about 6 px).
    """
    S = resolution
    image = Image.new("RGB", (S, S), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for obj in objects:
        x0, y0, x1, y1 = _pixel_box(obj, S)
        fill = PALETTE[obj["color"]]
        if obj["shape"] == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif obj["shape"] == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif obj["shape"] == "triangle":
            # Upright isosceles: apex at top centre, base along the bottom edge.
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
        else:
            raise ValueError(f"unknown shape {obj['shape']!r}")
    return np.asarray(image, dtype=np.uint8)


def shapes_batch(
    seed: int, step: int, batch_size: int, resolution: int, start: int = 0, stop: int | None = None,
    num_examples: int = 0, holdout=(),
) -> tuple[np.ndarray, list[str]]:
    """Rows [start, stop) of the global batch for training step `step`.

    Returns images uint8 (stop - start, S, S, 3) and their captions. Example i draws from
    its own generator seeded with (seed, step, i), so the batch is a pure function of
    (seed, step) (a resumed run sees the same data) and any slice equals the same rows of
    the full batch without rendering the rest (each host renders only its own rows).

    num_examples > 0 makes the world finite: row i of step k is scene number
    (k * batch_size + i) mod num_examples, seeded with (seed, scene), so consecutive steps
    walk through the same scenes in epochs (used to show that a model can overfit).
    holdout: (colour, shape) pairs never drawn in relations (see `held_out`).
    """
    stop = batch_size if stop is None else stop
    if not 0 <= start <= stop <= batch_size:
        raise ValueError(f"need 0 <= start <= stop <= batch_size, got {start}, {stop}, {batch_size}")
    images = np.empty((stop - start, resolution, resolution, 3), dtype=np.uint8)
    captions = []
    for row, i in enumerate(range(start, stop)):
        key = (seed, (step * batch_size + i) % num_examples) if num_examples else (seed, step, i)
        caption, objects = sample_scene(np.random.default_rng(key), holdout=holdout)
        images[row] = render(objects, resolution)
        captions.append(caption)
    return images, captions
