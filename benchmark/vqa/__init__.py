"""VQA with the VLM: multiple-choice question sets (:mod:`benchmark.vqa.questions`).

Importing this package imports no torch; the ``fscl vqa`` verb lives in
:mod:`benchmark.vqa.commands`, the building of a stream's set in :mod:`benchmark.vqa.build`.
"""
