"""Worker for the per-node handoff test: one trainer rank per simulated node (torchrun --nnodes 2,
one process each), each loading the real SGLang server of its own node.

Usage: torchrun --nnodes 2 --node-rank K --nproc-per-node 1 ... sglang_handoff_worker.py ROOT API_KEY URL0 URL1
ROOT holds hf1/ and hf2/ (two sets of weights). The actor loads each in turn and the handoff pushes
it; after each push every rank asks its own server for greedy tokens. Writes ROOT/rank{K}.json with
those tokens, the servers each rank sent tensors to, and the broadcasts made during the handoffs.
"""

import json
import sys

PROMPTS = [[5, 17, 33, 2], [9, 9], [100, 4, 77, 31, 12, 8, 3], [42]]


def main(root: str, api_key: str, urls: list[str]) -> None:
    import torch.distributed as dist

    from megatron_fipo.actor.actor import build_actor
    from megatron_fipo.bridge.hf_io import HFCheckpointReader
    from megatron_fipo.bridge.weights import iter_hf_buckets, load_hf_weights
    from megatron_fipo.config import ActorConfig, OptimConfig, RolloutConfig, RunConfig, SGLangConfig
    from megatron_fipo.rollout import sglang_http
    from megatron_fipo.rollout.sglang_engine import SGLangEngine
    from megatron_fipo.rollout.sglang_handoff import build_handoff

    cfg = RunConfig(run_dir=f"{root}/run", actor=ActorConfig(model_config=f"{root}/hf1", precision="fp32", seed=7),
                    optim=OptimConfig(lr=1e-3, lr_warmup_steps=0),
                    rollout=RolloutConfig(engine="sglang", placement="colocated", sglang=SGLangConfig(
                        urls=urls, api_key=api_key, weight_transport="tensor", release_memory=False,
                        startup_timeout_s=600)))
    actor = build_actor(cfg)
    rank = dist.get_rank()
    engine = SGLangEngine(cfg.rollout, actor.arch, cfg.run_dir) if rank == 0 else None  # the loop's layout
    handoff = build_handoff(cfg, engine)

    tensor_posts, broadcasts = [], []
    post = sglang_http.SGLangHTTP.post

    def recording_post(self, path, payload=None, timeout_s=None):
        if path == "/update_weights_from_tensor":
            tensor_posts.append(self.url)
        return post(self, path, payload, timeout_s)

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            broadcasts.append(name)
            return fn(*args, **kwargs)
        return wrapped

    sglang_http.SGLangHTTP.post = recording_post
    greedy = []
    for version, weights in enumerate(("hf1", "hf2")):
        load_hf_weights(actor, HFCheckpointReader(f"{root}/{weights}"))
        originals = {name: getattr(dist, name) for name in ("broadcast", "broadcast_object_list")}
        for name, fn in originals.items():
            setattr(dist, name, counting(name, fn))
        # Small buckets: several per push, as the bridge sends a large model.
        handoff.sync(iter_hf_buckets(actor, 1 << 16, handoff.sink_ranks), version)
        for name, fn in originals.items():
            setattr(dist, name, fn)
        dist.barrier()  # rank 0 flushes every server's cache after the handoff: none may be busy then
        out = sglang_http.SGLangHTTP(urls[rank], api_key).post("/generate", {
            "input_ids": PROMPTS, "sampling_params": {"temperature": 0.0, "max_new_tokens": 12}})
        greedy.append({"tokens": [o["output_ids"] for o in out], "version": [o["meta_info"]["weight_version"] for o in out]})
    with open(f"{root}/rank{rank}.json", "w") as f:
        json.dump({"sinks": sorted(handoff.sink_ranks), "tensor_posts": sorted(set(tensor_posts)),
                   "tensor_post_count": len(tensor_posts), "broadcasts": broadcasts, "greedy": greedy}, f)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
