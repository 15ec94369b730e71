"""Merge methods on the streaming engine: name -> (merge function, accepted parameters)."""

from . import pcb

METHODS = {
    "pcb": (pcb.merge_pcb, pcb.PARAMS),
}
