"""Which transformer layers each pipeline rank (and each of its model chunks) holds.

Stages split ``num_layers`` evenly, or unevenly with explicit first/last stage sizes
(``--decoder-first-pipeline-num-layers``/``--decoder-last-pipeline-num-layers``; the middle
stages share the rest evenly). With ``vp`` virtual stages per rank (interleaved schedule) each
rank's share is cut into ``vp`` equal chunks and the model runs through the virtual stages in the
order ``(chunk 0 of rank 0, chunk 0 of rank 1, ..., chunk 0 of the last rank, chunk 1 of rank
0, ...)``, as in Megatron-LM.
"""

from __future__ import annotations


def stage_num_layers(num_layers: int, pp: int, first: int | None = None,
                     last: int | None = None) -> list[int]:
    """Layers per pipeline stage, ``[pp]``; raises ``ValueError`` when they cannot add up."""
    if pp < 1:
        raise ValueError(f"pipeline parallel size {pp} must be >= 1")
    if first is None and last is None:
        if num_layers % pp:
            raise ValueError(
                f"--num-layers {num_layers} is not divisible by --pipeline-model-parallel-size "
                f"{pp}; change one of them or set --decoder-first-pipeline-num-layers / "
                "--decoder-last-pipeline-num-layers for uneven stages")
        return [num_layers // pp] * pp
    if pp == 1:
        raise ValueError("--decoder-first/last-pipeline-num-layers need "
                         "--pipeline-model-parallel-size > 1")
    for name, v in (("first", first), ("last", last)):
        if v is not None and v < 1:
            raise ValueError(f"--decoder-{name}-pipeline-num-layers {v} must be >= 1")
    middle = pp - (first is not None) - (last is not None)
    rest = num_layers - (first or 0) - (last or 0)
    if middle == 0:
        if rest != 0:
            raise ValueError(
                f"--decoder-first-pipeline-num-layers {first} + --decoder-last-pipeline-num-"
                f"layers {last} = {first + last} must equal --num-layers {num_layers} with "
                f"{pp} pipeline stages")
        return [first, last]
    if rest < middle or rest % middle:
        raise ValueError(
            f"after the first/last stages ({first}, {last}) {rest} of --num-layers {num_layers} "
            f"remain for {middle} other pipeline stages; they must split evenly with at least "
            "one layer each")
    sizes = [rest // middle] * pp
    if first is not None:
        sizes[0] = first
    if last is not None:
        sizes[-1] = last
    return sizes


def pipeline_layer_layout(num_layers: int, pp: int, vp: int = 1, first: int | None = None,
                          last: int | None = None) -> list[list[tuple[int, int]]]:
    """``layout[pp_rank][chunk] = (layer_offset, num_layers)`` (0-based offsets, global).

    ``vp`` chunks per rank: each stage's layers must split into ``vp`` equal parts.
    """
    if vp < 1:
        raise ValueError(f"virtual pipeline size {vp} must be >= 1")
    if vp > 1 and pp < 2:
        raise ValueError("virtual pipeline stages (interleaved schedule) need "
                         "--pipeline-model-parallel-size >= 2")
    sizes = stage_num_layers(num_layers, pp, first, last)
    for r, n in enumerate(sizes):
        if n % vp:
            raise ValueError(f"pipeline stage {r} holds {n} layers, which do not split into "
                             f"{vp} virtual stages; choose sizes divisible by {vp}")
    layout: list[list[tuple[int, int]]] = [[] for _ in range(pp)]
    offset = 0
    for _ in range(vp):
        for r in range(pp):
            n = sizes[r] // vp
            layout[r].append((offset, n))
            offset += n
    return layout
