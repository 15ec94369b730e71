"""The drivers: merges of files, adapters and distributed ranks, run above io/ (docs/architecture.md)."""
