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

    torchrun --nproc-per-node 2 examples/train_ddp.py --engine fsdp2 --from-meta --checkpoint ckpt
    torchrun --nproc-per-node 2 examples/train_ddp.py --engine fsdp2 --from-meta --resume ckpt --steps 40

With --from-meta the model is built on the meta device (shapes only), injected and sharded there, and
`lora_fx.load_base` reads each rank's rows of every weight from the checkpoint folder (--base); no
rank ever holds the whole model. --checkpoint writes training checkpoints (LoRA, optimizer, step,
random state; no base weights) that --resume continues from, on any number of ranks.
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
    ap.add_argument("--from-meta", action="store_true",
                    help="build the model on the meta device (no memory) and read the base from --base: "
                         "with fsdp2 each rank reads only its own shards")
    ap.add_argument("--base", default="results/ddp_base",
                    help="the base model's Hugging Face checkpoint folder (safetensors); written from the "
                         "example's model when it does not exist")
    ap.add_argument("--checkpoint", help="write a training checkpoint here every --save-every steps and at the end")
    ap.add_argument("--save-every", type=int, default=10)
    ap.add_argument("--resume", help="resume from this training checkpoint (saved on any number of ranks)")
    args = ap.parse_args()
    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if args.backend == "nccl" else torch.device("cpu")
    config = LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512)
    if args.from_meta:
        if rank == 0 and not os.path.isdir(args.base):  # stands in for a downloaded checkpoint
            torch.manual_seed(0)
            LlamaForCausalLM(config).save_pretrained(args.base, max_shard_size="500KB")
        dist.barrier()
        with torch.device("meta"):
            model = LlamaForCausalLM(config)  # shapes only: no rank ever holds the whole model
    else:
        torch.manual_seed(0)  # same base weights on every rank
        model = LlamaForCausalLM(config).to(device)
    torch.manual_seed(1)  # the same LoRA init on every rank
    data = torch.randint(0, 512, (64, 32), generator=torch.Generator().manual_seed(1))
    gm = lora_fx.inject_lora(model, ["q_proj", "v_proj"], rank=8, alpha=16,
                             example_inputs={"input_ids": data[:2].to(device), "labels": data[:2].to(device)})
    gm.train()
    del model  # gm holds the weights now; after sharding nothing holds them whole (FSDP2 path)
    if args.engine == "ddp":
        if args.from_meta:
            lora_fx.load_base(gm, args.base, device=device)  # every rank the whole base: DDP replicates it
        module = torch.nn.parallel.DistributedDataParallel(gm)
    else:
        module = lora_fx.unflatten(gm)  # gm shares the tree's layers and lets go of the model
        fully_shard(module.model.embed_tokens)
        for layer in module.model.layers.children():
            fully_shard(layer)
        fully_shard(module.lm_head)
        fully_shard(module)
        if args.from_meta:
            report = lora_fx.load_base(gm, args.base)  # each rank reads the rows of its own shards
            print(f"rank {rank}: read {report.bytes_read / 2**20:.1f} MB of the base in {report.seconds:.2f} s", flush=True)
    trains = gm if args.engine == "ddp" else module  # what the optimizer state is named through
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=3e-3)
    start = lora_fx.load_checkpoint(args.resume, gm, opt, module=trains) if args.resume else 0
    shard = data[rank::world].to(device)  # each rank its own slice of the data
    for step in range(start, args.steps):
        batch = shard[(step * 4) % len(shard):][:4]
        loss = module(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if rank == 0 and step % 5 == 0:
            print(f"step {step}: loss {loss.item():.3f} (rank 0 of {world})", flush=True)
        if args.checkpoint and ((step + 1) % args.save_every == 0 or step + 1 == args.steps):
            lora_fx.save_checkpoint(args.checkpoint, gm, opt, module=trains, step=step + 1)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    saved = lora_fx.save_adapter(gm, args.out)  # every rank: FSDP2's LoRA shards are gathered; rank 0 writes
    if rank == 0:
        print("saved", saved)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
