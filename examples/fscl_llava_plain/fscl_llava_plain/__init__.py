"""``llava-plain``: LLaVA-1.5's weights asked in the plain template, without its system prompt and roles.

``vqa.model: llava-plain:/path/to/folder`` loads the same folder as ``llava:/path/to/folder`` (a saved
``LlavaForConditionalGeneration`` and its processor) and changes only how the model is asked::

    <image>
    {question}
    Answer:

for the VQA evaluation (the option letter is scored at the first token after ``Answer:``) and for the
training pairs of the VLM-loss strategies (``lorsu-ppl``, ``lora-ppl``: the prompt, then `` {answer}</s>``).

This module, the package's ``fscl.plugins`` entry, declares the family without importing torch, so that
``fscl ls vlms`` stays fast with the package installed; the family (:mod:`fscl_llava_plain.family`) is
imported when a run or the grid check first resolves a ``llava-plain:`` value.
"""
from benchmark.registry import VLMS

VLMS.declare(
    "llava-plain", "fscl_llava_plain.family:PlainLlavaFamily",
    summary="LLaVA-1.5's weights asked in the plain template (<image>, the question, 'Answer:'); no system prompt.",
    load_forms=("llava-plain:/path/to/folder  (the folder of llava:/path/to/folder)",))
