"""The embedded demo data set: synthetic scenes of coloured shapes, five true captions per image.

Why it exists: ``make demo``, the tests and the loss ablations need an image-caption collection that is
available offline, builds in seconds, and is learnable by a small CNN + GRU on CPU in minutes, yet is not
trivial. It must also contain what LSEH feeds on (semantically related captions): wrong captions that are
semantically close to the right one ("a red circle left of a blue box" vs "... right of a blue box").

Scenes. An image shows 1-3 objects on a dark background (random tint, a linear gradient, pixel noise).
Each object has a shape (circle, square, triangle, star, cross), a colour (red, green, blue, yellow,
purple, orange, white), a size (small, large) and one of the nine cells of a 3x3 grid (top left ... bottom
right); two objects never share a cell. Rendering adds nuisance that captions do not mention: a small
position jitter, colour jitter and a random rotation of polygons. About a third of the scenes are
*siblings*: copies of an earlier scene with one edit (a colour, a shape, a size, a move, a swap of two
objects, one object added or dropped), so near-duplicate scenes are common. Exact duplicates are avoided
by rejection sampling; the count that remains is stored under ``stats.duplicate_scenes``.

Captions. Five per image, each from a different template family (a listing with positions, a spatial
relation, counts, sizes, a position-first sentence), with synonyms ("circle"/"round disc"/"disc",
"square"/"box"/"block", "to the left of"/"left of", "above"/"over", ...). Every caption only states facts
of its scene, and all images share one small vocabulary.

Labels. ``label = shape of the main object x number of objects`` (5 x 3 = 15 classes, names
``"circle/1"`` ... ``"cross/3"``). The main object is the large one; among equals, the first in reading
order (top row first, then left to right).

Output. A Karpathy-style JSON (``dataset_demo.json``) next to an ``images/`` folder of PNGs; each image
entry also holds its ``scene`` (the ground truth the captions were written from). Everything is a pure
function of ``(num_images, seed, image_size)``: the same bytes every run.

Modules: :mod:`.scenes` (the world, scene sampling, labels), :mod:`.captions` (the caption grammar),
:mod:`.render` (drawing), :mod:`.build` (generation, caching, publishing). What callers outside the package use is
re-exported here; the rest is imported from its module.
"""

from vsekit.data.demo.build import DATASET_FILE, build_demo
from vsekit.data.demo.captions import DEMO_QUERIES

__all__ = ["DATASET_FILE", "DEMO_QUERIES", "build_demo"]
