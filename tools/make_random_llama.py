"""Make a random-weight Llama-3.1-8B-shaped checkpoint and rank-32 PEFT adapters
for the decode throughput benchmark (runtime/gpu TestDecodeBench).

Runs on the device machine (torch + safetensors; the GPU makes the random
numbers). Writes, under OUTDIR (default /tmp/llama8b-random):
  base/config.json, base/model-0000i-of-0000n.safetensors, base/model.safetensors.index.json
      bf16, ~16 GB for 32 layers, shards of about 2 GB
  adapters/a<i>/adapter_config.json, adapter_model.safetensors
      N adapters (default 4) of rank R (default 32) on all seven projections, bf16
With --fp8 the projections are stored as an FP8 checkpoint in the
compressed-tensors "FP8 dynamic" layout instead (float8_e4m3fn with a float32
weight_scale per output row, quantization_config in config.json; ~8.5 GB).
Weights are N(0, 0.02) (norms 1 + N(0, 0.1)): the numbers mean nothing, only
their shapes and bytes matter for timing.
usage: python3 make_random_llama.py [OUTDIR] [--layers 32] [--adapters 4] [--rank 32] [--fp8]
"""
import argparse, json, os, time
import torch
from safetensors.torch import save_file

ap = argparse.ArgumentParser()
ap.add_argument("out", nargs="?", default="/tmp/llama8b-random")
ap.add_argument("--layers", type=int, default=32)
ap.add_argument("--adapters", type=int, default=4)
ap.add_argument("--rank", type=int, default=32)
ap.add_argument("--shard-gb", type=float, default=2.0)
ap.add_argument("--fp8", action="store_true", help="projections as F8_E4M3 with per-row weight_scale")
args = ap.parse_args()

H, I, NH, KVH, HD, V = 4096, 14336, 32, 8, 128, 128256
cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
       "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16",
       "vocab_size": V, "hidden_size": H, "intermediate_size": I, "num_hidden_layers": args.layers,
       "num_attention_heads": NH, "num_key_value_heads": KVH, "head_dim": HD,
       "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
       "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192},
       "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001}
if args.fp8:
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"],
                                      "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "dynamic": False, "symmetric": True},
                                      "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}}}}
MODS = {"q_proj": ("self_attn", H, NH * HD), "k_proj": ("self_attn", H, KVH * HD), "v_proj": ("self_attn", H, KVH * HD),
        "o_proj": ("self_attn", NH * HD, H), "gate_proj": ("mlp", H, I), "up_proj": ("mlp", H, I), "down_proj": ("mlp", I, H)}

t0 = time.time()
dev = torch.device("cuda")
g = torch.Generator(device=dev).manual_seed(20261201)


def rnd(shape, std=0.02, mean=0.0):
    return (torch.randn(shape, generator=g, device=dev, dtype=torch.float32) * std + mean).to(torch.bfloat16).cpu()


def fp8(shape, std=0.02):
    """e4m3 weight and its per-row scale (amax / 448), as the FP8 dynamic checkpoints store them"""
    w = torch.randn(shape, generator=g, device=dev, dtype=torch.float32) * std
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 448.0
    return (w / scale).to(torch.float8_e4m3fn).cpu(), scale.cpu()


def is_proj(name):
    return args.fp8 and name.endswith("_proj.weight")


base = os.path.join(args.out, "base")
os.makedirs(base, exist_ok=True)
json.dump(cfg, open(os.path.join(base, "config.json"), "w"), indent=2)
tensors = [("model.embed_tokens.weight", (V, H))]
for l in range(args.layers):
    p = f"model.layers.{l}."
    tensors += [(p + "input_layernorm.weight", (H,)), (p + "post_attention_layernorm.weight", (H,))]
    for m, (parent, fin, fout) in MODS.items():
        tensors.append((f"{p}{parent}.{m}.weight", (fout, fin)))
tensors += [("model.norm.weight", (H,)), ("lm_head.weight", (V, H))]

# assign tensors to shards first (names need the shard count), then write each shard as it fills
groups, cur, size = [], [], 0
for name, shape in tensors:
    cur.append((name, shape))
    size += (1 if is_proj(name) else 2) * torch.Size(shape).numel()
    if size >= args.shard_gb * 1e9:
        groups.append(cur)
        cur, size = [], 0
if cur:
    groups.append(cur)
weight_map, total = {}, 0
for i, grp in enumerate(groups):
    fn = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
    sh = {}
    for name, shape in grp:
        if is_proj(name):
            sh[name], sh[name + "_scale"] = fp8(shape)
        else:
            sh[name] = rnd(shape, 0.1, 1.0) if "norm" in name else rnd(shape)
    save_file(sh, os.path.join(base, fn), metadata={"format": "pt"})
    for k, v in sh.items():
        weight_map[k] = fn
        total += v.numel() * v.element_size()
    del sh
json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, open(os.path.join(base, "model.safetensors.index.json"), "w"), indent=1)
print(f"base: {total / 1e9:.2f} GB in {len(weight_map)} tensors ({time.time() - t0:.1f}s)", flush=True)

for a in range(args.adapters):
    d = os.path.join(args.out, "adapters", f"a{a}")
    os.makedirs(d, exist_ok=True)
    ac = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": args.rank, "lora_alpha": 2 * args.rank,
          "target_modules": list(MODS), "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
          "base_model_name_or_path": "llama-3.1-8b-shape-random", "fan_in_fan_out": False, "inference_mode": True}
    json.dump(ac, open(os.path.join(d, "adapter_config.json"), "w"), indent=2)
    t = {}
    for l in range(args.layers):
        for m, (parent, fin, fout) in MODS.items():
            pre = f"base_model.model.model.layers.{l}.{parent}.{m}"
            t[pre + ".lora_A.weight"] = rnd((args.rank, fin))
            t[pre + ".lora_B.weight"] = rnd((fout, args.rank))
    save_file(t, os.path.join(d, "adapter_model.safetensors"), metadata={"format": "pt"})
print(f"wrote {args.out}: {args.adapters} adapters of rank {args.rank} ({time.time() - t0:.1f}s)")
