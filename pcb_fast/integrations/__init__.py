"""Adapters that let other model-merging tools run pcb_fast's engine (FusionBench: ``fusion_bench``)."""
