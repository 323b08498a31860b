"""The leakage suite: play the curious worker over a recorded run and measure what it learns.

``tempo train --record DIR`` writes the adversary's view and the ground truth; ``tempo attack
DIR [DIR...]`` runs every attack in :data:`ATTACKS` on each recording and writes a report.
Each attack is one module with ``NAME`` and ``run(ctx) -> Finding``.
"""

from __future__ import annotations

# In report order: what a thief gets first, then the mechanisms that give it to them.
ATTACKS = ("direct_use", "finetune", "linking", "alignment", "weights", "inputs", "spatial_inputs", "separation",
           "samples", "gram", "gram_units")
