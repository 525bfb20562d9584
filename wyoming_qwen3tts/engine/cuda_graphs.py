"""Recording a function as a CUDA graph, to be replayed with one call instead of relaunching it.

On a GPU the code predictor's 15 steps of a frame are about 4,400 small operators, and each costs
host time to launch (the talker's attention took 4 to 14 µs per operator on the H200 machine,
its time over its operators in BENCHMARKS.md "device check: talker attention"; at those rates, an
estimate, some 20 to 60 ms of host time a frame for a few milliseconds of GPU work, at any batch
size). A CUDA graph records the kernels
of one run and replays them all with one call. This is PyTorch's own recording
(`torch.cuda.CUDAGraph`), without torch.compile: it takes two eager runs and the recording, where
compiling took minutes.

A recorded function must read only tensors that stay where they are (its inputs are filled in
place before each replay) and do nothing on the host that depends on values on the GPU; its
output is overwritten by the next replay (copy it out).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class CudaGraphRecorder:
    """Records functions as CUDA graphs that share one memory pool (one owner thread: the replays
    of one recorder never overlap, so their temporary memory may)."""

    def __init__(self) -> None:
        self._pool = None

    def record(self, run: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """``run`` recorded; calling the result replays it and returns the (overwritten) output."""
        # Lazy set-up (cuBLAS handles and workspaces, kernel loading) must not happen inside the
        # recording: run twice first on a side stream, as PyTorch's documentation does.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # Thread-local: the decode threads may use the GPU meanwhile (a batch larger than any
        # recorded at start-up records while serving); only this thread's calls must be legal.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            output = run()
        self._pool = graph.pool()

        def replay() -> torch.Tensor:
            graph.replay()
            return output

        return replay
