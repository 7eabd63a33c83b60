"""Data-parallel LoRA training with torchrun (one node or many): DDP, or FSDP2 per layer.

    torchrun --nproc-per-node 2 examples/train_ddp.py                      # one machine, 2 processes
    torchrun --nproc-per-node 2 examples/train_ddp.py --engine fsdp2       # FSDP2, one group per layer
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 \\
             --master-addr node0 --master-port 29500 examples/train_ddp.py --backend nccl   # on node 0
    (the same with --node-rank 1 on node 1)

What lora-fx does on each rank: every rank captures the model itself (same code, same example
inputs: the graph does not depend on the rank), injects LoRA with the same seed (so every rank starts
from the same A), and DistributedDataParallel then all-reduces the gradients of the LoRA weights only:
the frozen base weights have requires_grad=False and never enter a bucket. Rank 0 saves the adapter.
With --engine fsdp2 the module tree (`lora_fx.unflatten`) is sharded layer by layer (frozen base and
trainable LoRA in one group, which FSDP2 allows); every rank calls save_adapter (LoRA's shards are
gathered) and rank 0 writes.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

import lora_fx


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="gloo", help="gloo (CPU) or nccl (GPU)")
    ap.add_argument("--engine", choices=["ddp", "fsdp2"], default="ddp")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="results/ddp_adapter")
    args = ap.parse_args()
    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if args.backend == "nccl" else torch.device("cpu")
    torch.manual_seed(0)  # same base weights and same LoRA init on every rank
    model = LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=512)).to(device)
    data = torch.randint(0, 512, (64, 32), generator=torch.Generator().manual_seed(1))
    gm = lora_fx.inject_lora(model, ["q_proj", "v_proj"], rank=8, alpha=16,
                             example_inputs={"input_ids": data[:2].to(device), "labels": data[:2].to(device)})
    gm.train()
    del model  # gm holds the weights now; after sharding nothing holds them whole (FSDP2 path)
    if args.engine == "ddp":
        module = torch.nn.parallel.DistributedDataParallel(gm)
    else:
        module = lora_fx.unflatten(gm)  # gm shares the tree's layers and lets go of the model
        fully_shard(module.model.embed_tokens)
        for layer in module.model.layers.children():
            fully_shard(layer)
        fully_shard(module.lm_head)
        fully_shard(module)
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=3e-3)
    shard = data[rank::world].to(device)  # each rank its own slice of the data
    for step in range(args.steps):
        batch = shard[(step * 4) % len(shard):][:4]
        loss = module(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if rank == 0 and step % 5 == 0:
            print(f"step {step}: loss {loss.item():.3f} (rank 0 of {world})", flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    saved = lora_fx.save_adapter(gm, args.out)  # every rank: FSDP2's LoRA shards are gathered; rank 0 writes
    if rank == 0:
        print("saved", saved)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
