"""A synthetic music world: short songs with hidden, audible qualities and the counts they earn.

Why it exists: the demo, the tests and the feedback-loop simulation need songs whose
"true" quality is known, so that a ranker can be checked against ground truth. Real
catalogues never give that. Everything here is SYNTHETIC and marked so at every level:
song ids start with ``syn-``, every generator name starts with ``synthetic`` (a
:class:`GeneratorSpec` refuses any other), the catalogue has a boolean column
``synthetic`` (always True), the Parquet schema carries ``apexrank.synthetic = true``
(:func:`read_catalog` refuses tables without it), the sidecar ``catalog.json`` says so,
and every audio file carries the comment ``apexrank synthetic song``. Never mix these
rows into real data, and never report a number measured on them as a result on music.

The parts, in the order of the generative story (world version 1):

* :mod:`ranker.synth.cast`: generators, styles and hidden qualities; a new song's spec (steps 1-3);
* :mod:`ranker.synth.compose`: the score, where consonance, steadiness and repetition act (step 4);
* :mod:`ranker.synth.render`: the sound, where noise and smoothness act (step 4);
* :mod:`ranker.synth.world`: aesthetic labels, appeal, likes, exposure and counts (steps 5-7);
* :mod:`ranker.synth.catalog`: a whole catalogue written to disk.

Determinism: song ``i`` of seed ``s`` draws its spec from ``SeedSequence([s, 0, i])`` and
its audio from the spec's own seed, so the same seed gives identical tables and
identical audio bytes, whatever the number of worker processes. Creation times, labels,
appeal and counts come from ``SeedSequence([s, 1])``.

Using it: :func:`simulate_catalog` writes a whole catalogue; :func:`sample_world` draws the
same story without audio; a loop simulation gets each new song from
:func:`sample_song_spec` and :func:`synthesize_song`, and its truth from
:func:`aesthetic_labels`, :func:`appeal_scores` and :func:`like_probability` on a one-row
quality array.
"""

from ranker.synth.cast import (
    AESTHETIC_NAMES,
    DEFAULT_GENERATORS,
    NOVEL_GENERATOR,
    QUALITY_NAMES,
    STYLES,
    WITH_NOVEL_GENERATOR,
    WORLD_VERSION,
    GeneratorSpec,
    Qualities,
    SongSpec,
    Style,
    sample_song_spec,
)
from ranker.synth.catalog import CatalogResult, read_catalog, simulate_catalog
from ranker.synth.compose import Composition, Part, compose_song
from ranker.synth.render import render_composition, synthesize_song
from ranker.synth.world import (
    APPEAL_WEIGHTS,
    LABEL_WEIGHTS,
    World,
    aesthetic_labels,
    appeal_scores,
    draw_engagement,
    like_probability,
    sample_world,
)

__all__ = [
    "AESTHETIC_NAMES",
    "APPEAL_WEIGHTS",
    "DEFAULT_GENERATORS",
    "LABEL_WEIGHTS",
    "NOVEL_GENERATOR",
    "QUALITY_NAMES",
    "STYLES",
    "WITH_NOVEL_GENERATOR",
    "WORLD_VERSION",
    "CatalogResult",
    "Composition",
    "GeneratorSpec",
    "Part",
    "Qualities",
    "SongSpec",
    "Style",
    "World",
    "aesthetic_labels",
    "appeal_scores",
    "compose_song",
    "draw_engagement",
    "like_probability",
    "read_catalog",
    "render_composition",
    "sample_song_spec",
    "sample_world",
    "simulate_catalog",
    "synthesize_song",
]
