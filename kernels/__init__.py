"""Triton kernels of pcb_fast, installed as ``pcb_fast.kernels`` (DESIGN.md 4).

They import nothing of pcb_fast. None are built yet: the torch backend runs every pass today.
"""
