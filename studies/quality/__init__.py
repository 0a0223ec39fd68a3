"""The self-update quality study (issue 6): do rounds make the model better, not just different?

``python -m studies.quality`` runs it (:mod:`studies.quality.study`),
``python -m studies.quality.report`` rebuilds ``docs/quality.md`` from its results, and
``python -m studies.quality.noise`` measures the sampling noise of its diversity probe. See
``studies/quality/README.md``.
"""
