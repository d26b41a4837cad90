"""Worker: actor logprobs at TP=1 against transformers' on the same HF checkpoints.

Usage: torchrun --nproc-per-node 1 rope_worker.py OUT HF_DIR [HF_DIR ...]; writes OUT (max |diff| per dir).
"""

import sys


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_fipo.actor.actor import build_actor
    from megatron_fipo.bridge.hf_io import HFCheckpointReader
    from megatron_fipo.bridge.weights import load_hf_weights
    from megatron_fipo.config import ActorConfig, TrainerSections
    from megatron_fipo.sequences import SequenceBatch

    out, *dirs = sys.argv[1:]
    g = torch.Generator().manual_seed(3)
    # Long enough (up to 300 positions) for the RoPE base to matter.
    prompts = [torch.randint(1, 256, (n,), generator=g).tolist() for n in (40, 7)]
    responses = [torch.randint(1, 256, (n,), generator=g).tolist() for n in (260, 90)]
    batch = SequenceBatch(prompts, responses)
    results = {}
    for hf in dirs:
        reader = HFCheckpointReader(hf)
        actor = build_actor(TrainerSections(actor=ActorConfig(model_config=hf, precision="fp32")), reader.arch())
        load_hf_weights(actor, reader)
        logp, _ = actor.compute_logprobs(batch)
        model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
        worst = 0.0
        for i, (p, r) in enumerate(zip(prompts, responses)):
            ids = torch.tensor([p + r])
            with torch.no_grad():
                ref = torch.log_softmax(model(ids).logits[0, len(p) - 1 : -1].float(), -1)
            ref = ref.gather(-1, torch.tensor(r).unsqueeze(-1)).squeeze(-1)
            worst = max(worst, ((logp[i, : len(r)] - ref).abs() / ref.abs().clamp(min=1)).max().item())
        results[hf] = {"rope_theta": actor.arch.rope_theta, "max_rel_diff": worst,
                       "hf_rope_theta": model.config.rope_parameters["rope_theta"]}
    torch.save(results, out)


if __name__ == "__main__":
    main()
