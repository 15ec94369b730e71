"""Triton kernels of pcb_fast, installed as ``pcb_fast.kernels`` (docs/design.md 4).

- ``tiles``: the task rows on the device and the [tasks, BLOCK] tile every kernel loads;
- ``select``: sampled brackets and the radix select (counts, bin find on the device);
- ``score``: |tau| and PCB scores fused with the select counts;
- ``merge``: the final weighted merge, base add, lam and dtype cast;
- ``linear``, ``ties``: the baselines; ``breadcrumbs``: Breadcrumbs' per-row band.

They import nothing of pcb_fast (only torch and triton). Importing them needs triton; on a CPU
their kernels run only under TRITON_INTERPRET=1.
"""
