"""SGLang's memory tags on one server, tracked the way its scheduler tracks them, so every call is legal.

SGLang 0.5.23 (``srt/managers/scheduler_components/weight_updater.py``) keeps a set ``offload_tags``:

- ``/release_memory_occupation`` asserts the server is idle, adds the named tags (every tag when none
  is named) and frees their memory; releasing ``weights`` stashes the model's buffers first.
- ``/resume_memory_occupation`` calls ``offload_tags.remove(tag)`` for each named tag (every tag when
  none is named): a tag that is not released raises KeyError in the scheduler. Resuming ``weights``
  restores the stash, which exists only after a release.
- Nothing checks that weights are resident when an update writes them, nor that the KV cache and
  CUDA graphs are resident when a request runs: on a GPU that writes or reads unmapped memory.

So tags are always named (never "all"), only resident tags are released and only released ones
resumed, and each phase of the loop says which tags it needs resident:

- ``train``: none, the trainer has the GPU;
- ``update``: the weights, resident only to be overwritten (KV cache and CUDA graphs stay released);
- ``generate`` (rollouts and eval): weights, KV cache and CUDA graphs.

A new server holds every tag, except a colocated one a job script started: the script releases all
of them before the trainer starts (launch/sbatch.py), so its handle starts with all released.
"""

from __future__ import annotations

from typing import Callable, Literal

WEIGHTS, KV_CACHE, CUDA_GRAPH = "weights", "kv_cache", "cuda_graph"
ALL_TAGS = (WEIGHTS, KV_CACHE, CUDA_GRAPH)  # SGLang's GPU_MEMORY_ALL_TYPES
Phase = Literal["train", "update", "generate"]
RESIDENT: dict[str, tuple[str, ...]] = {"train": (), "update": (WEIGHTS,), "generate": ALL_TAGS}


class ServerMemory:
    """The tags one server holds released. ``releasable`` is False where memory is never given back
    (disaggregated placement, or ``rollout.sglang.release_memory=false``): then every phase keeps all.

    ``post(path, payload)`` is the server's HTTP call; it is called only while the server is idle.
    """

    def __init__(self, post: Callable[[str, dict], dict], releasable: bool):
        self.post = post
        self.releasable = releasable
        self.released: set[str] = set()

    def restarted(self) -> None:
        """A (re)started server holds every tag."""
        self.released = set()

    def all_released(self) -> None:
        """Every tag given back: a colocated server the job script released before the trainer started."""
        self.released = set(ALL_TAGS)

    def resident(self, tag: str) -> bool:
        return tag not in self.released

    def enter(self, phase: Phase) -> None:
        """Release what ``phase`` does not need and resume what it does, each tag at most once."""
        need = RESIDENT[phase]
        resume = [t for t in ALL_TAGS if t in need and t in self.released]
        release = [t for t in ALL_TAGS if t not in need and t not in self.released] if self.releasable else []
        if release:  # first, so the memory it frees is there for what is resumed
            self.post("/release_memory_occupation", {"tags": release})
            self.released.update(release)
        if resume:
            self.post("/resume_memory_occupation", {"tags": resume})
            self.released.difference_update(resume)
