"""Train a small Llama-3-family model (and a LoRA adapter on it) from the
Python source on the machine, for quality checks that need trained weights
(peftd eval: what FP8 costs on a model whose weights mean something; issue
14). Nothing is downloaded: the corpus is the Python standard library's
.py files, the tokenizer Meta's Llama 3.1 tokenizer.json (testdata/
llama3-tokenizer/model), the model a plain torch Llama written here (the
same math as transformers' LlamaForCausalLM: RMSNorm, rotate-half RoPE,
GQA, SiLU MLP, tied embeddings), saved as a Hugging Face folder.

Split by file: the files of one standard-library package
(--adapter-package, default "email") train the adapter (3 in 4) or are held
out for it, and are never seen by the base model; the base model trains on
the rest of the standard library and on site-packages (--more; up to
--max-train-mb), one file in 40 (by a hash of its path) held out. Every
file is read with its blank lines removed (peftd eval splits its text
files at blank lines); held-out files are cut to --doc-chars characters.

Writes under OUT (default /tmp/tiny-llama-trained):
  base/     config.json, generation_config.json, model.safetensors (bf16),
            tokenizer.json, tokenizer_config.json
  adapter/  adapter_config.json, adapter_model.safetensors (PEFT LoRA, rank
            --rank on all seven projections)
  heldout/  base.txt and adapter.txt: held-out files, one per paragraph
  prompts.txt  one generation prompt per line
  train.json   what was trained: sizes, steps, losses, seconds
usage: python3 tools/train_tiny_llama.py [OUT] [--minutes 3] [--adapter-minutes 1]
       --smoke: a tiny model and bytes for tokens, on the CPU, for a quick check of the code
"""
import argparse, hashlib, json, math, os, random, struct, sys, sysconfig, time

import torch
import torch.nn.functional as F

ap = argparse.ArgumentParser()
ap.add_argument("out", nargs="?", default="/tmp/tiny-llama-trained")
ap.add_argument("--tokenizer", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "testdata", "llama3-tokenizer", "model"))
ap.add_argument("--corpus", default=sysconfig.get_paths()["stdlib"], help="the adapter package's folder, and base training text")
ap.add_argument("--more", default=sysconfig.get_paths()["purelib"], help="more base training text (site-packages); '' for none")
ap.add_argument("--max-train-mb", type=float, default=50.0)
ap.add_argument("--adapter-package", default="email")
ap.add_argument("--minutes", type=float, default=3.0)
ap.add_argument("--adapter-minutes", type=float, default=1.0)
ap.add_argument("--hidden", type=int, default=512)
ap.add_argument("--layers", type=int, default=8)
ap.add_argument("--heads", type=int, default=8)
ap.add_argument("--kv-heads", type=int, default=2)
ap.add_argument("--inter", type=int, default=1536)
ap.add_argument("--ctx", type=int, default=512)
ap.add_argument("--batch", type=int, default=32)
ap.add_argument("--rank", type=int, default=16)
ap.add_argument("--doc-chars", type=int, default=3000)
ap.add_argument("--heldout-docs", type=int, default=24)
ap.add_argument("--deadline", type=float, default=0, help="seconds for the whole run (0: no limit): the training loops shrink to fit")
ap.add_argument("--smoke", action="store_true")
args = ap.parse_args()
if args.smoke:
    args.hidden, args.layers, args.heads, args.kv_heads, args.inter, args.ctx, args.batch = 64, 2, 4, 2, 128, 64, 8
    args.minutes, args.adapter_minutes = 0.1, 0.05

t_start = time.time()
dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
torch.manual_seed(20261129)
random.seed(20261129)

# --- corpus -----------------------------------------------------------------
def read_doc(path):
    try:
        text = open(path, encoding="utf-8").read()
    except (UnicodeDecodeError, OSError):
        return None
    lines = [l.rstrip() for l in text.split("\n")]
    text = "\n".join(l for l in lines if l.strip())
    return text if len(text) >= 200 else None


def py_files(top, skip):
    for root, dirs, files in os.walk(top):
        dirs[:] = sorted(d for d in dirs if d not in skip)
        for f in sorted(files):
            if f.endswith(".py"):
                yield os.path.join(root, f)


SKIP = ("test", "tests", "site-packages", "dist-packages", "__pycache__", "idlelib", "lib2to3")
base_train, base_held, ad_train, ad_held = [], [], [], []
budget = args.max_train_mb * 1e6
for top in [args.corpus] + ([args.more] if args.more and os.path.isdir(args.more) else []):
    for p in py_files(top, SKIP):
        rel = os.path.relpath(p, top)
        h = int(hashlib.sha256(rel.encode()).hexdigest(), 16)
        adapter = top == args.corpus and rel.split(os.sep)[0] == args.adapter_package
        # decide before reading: past the budget only held-out files are read
        if not adapter and (len(base_held) >= args.heldout_docs if h % 40 == 0 else budget <= 0):
            continue
        doc = read_doc(p)
        if doc is None:
            continue
        if adapter:
            if h % 4 == 0:
                ad_held.append(doc[: 4 * args.doc_chars])
            else:
                ad_train.append(doc)
        elif h % 40 == 0:
            base_held.append(doc[: 4 * args.doc_chars])
        else:
            base_train.append(doc)
            budget -= len(doc)
if not base_train or not ad_train or not ad_held or not base_held:
    sys.exit(f"corpus {args.corpus}: {len(base_train)}/{len(base_held)} base and {len(ad_train)}/{len(ad_held)} adapter files: too few")

# --- tokenizer --------------------------------------------------------------
BOS, EOS = 128000, 128001
if args.smoke:
    V = 512
    BOS, EOS = 1, 2
    def encode(s):
        return [3 + (b % (V - 3)) for b in s.encode()]
else:
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(args.tokenizer, "tokenizer.json"))
    V = 128256
    def encode(s):
        return tok.encode(s, add_special_tokens=False).ids


def stream(docs):
    if args.smoke:
        enc = [encode(d) for d in docs]
    else:
        enc = [e.ids for e in tok.encode_batch(docs, add_special_tokens=False)]
    ids = []
    for e in enc:
        ids += [BOS] + e + [EOS]
    return torch.tensor(ids, dtype=torch.long)


def cut(docs):
    """Held-out documents cut to the training context (args.ctx tokens: the
    positions the model was trained at), as text peftd eval re-encodes."""
    out = []
    for d in docs[: args.heldout_docs]:
        if args.smoke:
            out.append(d[: args.ctx])
        else:
            out.append(tok.decode(encode(d)[: args.ctx - 1]))  # peftd adds BOS
    return out


t0 = time.time()
base_held, ad_held = cut(base_held), cut(ad_held)
train_ids, ad_ids = stream(base_train), stream(ad_train)
print(f"corpus: {len(base_train)} base files ({train_ids.numel()} tokens), {len(ad_train)} adapter files ({ad_ids.numel()} tokens), "
      f"held out {len(base_held)} + {len(ad_held)}; tokenized in {time.time() - t0:.1f}s", flush=True)

# --- model ------------------------------------------------------------------
H, L, NH, KVH, I = args.hidden, args.layers, args.heads, args.kv_heads, args.inter
HD = H // NH
THETA = 500000.0
PROJ = {"q_proj": ("self_attn", H, NH * HD), "k_proj": ("self_attn", H, KVH * HD), "v_proj": ("self_attn", H, KVH * HD),
        "o_proj": ("self_attn", NH * HD, H), "gate_proj": ("mlp", H, I), "up_proj": ("mlp", H, I), "down_proj": ("mlp", I, H)}


def init_params():
    p = {"model.embed_tokens.weight": torch.randn(V, H) * 0.02, "model.norm.weight": torch.ones(H)}
    for l in range(L):
        pre = f"model.layers.{l}."
        p[pre + "input_layernorm.weight"] = torch.ones(H)
        p[pre + "post_attention_layernorm.weight"] = torch.ones(H)
        for m, (parent, fin, fout) in PROJ.items():
            std = 0.02 / math.sqrt(2 * L) if m in ("o_proj", "down_proj") else 0.02
            p[f"{pre}{parent}.{m}.weight"] = torch.randn(fout, fin) * std
    return {k: v.to(dev).requires_grad_() for k, v in p.items()}


def rmsnorm(x, w):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * w.to(x.dtype)


inv_freq = (1.0 / (THETA ** (torch.arange(0, HD, 2, dtype=torch.float32) / HD))).to(dev)


def rope(x, T):
    ang = torch.arange(T, device=dev, dtype=torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(x.dtype), torch.cat([ang.sin()] * 2, -1).to(x.dtype)
    x1, x2 = x[..., : HD // 2], x[..., HD // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def attention(q, k, v):
    if hasattr(F, "scaled_dot_product_attention"):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    T = q.shape[-2]  # torch < 2.0
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(s.float(), -1).to(q.dtype) @ v


def forward(p, ids, lora=None, scale=0.0):
    B, T = ids.shape
    x = F.embedding(ids, p["model.embed_tokens.weight"])

    def lin(name, inp):
        y = inp @ p[name].t().to(inp.dtype)
        if lora is not None and name in lora:
            a, b = lora[name]
            y = y + ((inp @ a.t().to(inp.dtype)) @ b.t().to(inp.dtype)) * scale
        return y

    for l in range(L):
        pre = f"model.layers.{l}."
        h = rmsnorm(x, p[pre + "input_layernorm.weight"])
        q = lin(pre + "self_attn.q_proj.weight", h).view(B, T, NH, HD).transpose(1, 2)
        k = lin(pre + "self_attn.k_proj.weight", h).view(B, T, KVH, HD).transpose(1, 2)
        v = lin(pre + "self_attn.v_proj.weight", h).view(B, T, KVH, HD).transpose(1, 2)
        q, k = rope(q, T), rope(k, T)
        k, v = k.repeat_interleave(NH // KVH, 1), v.repeat_interleave(NH // KVH, 1)
        a = attention(q, k, v).transpose(1, 2).reshape(B, T, NH * HD)
        x = x + lin(pre + "self_attn.o_proj.weight", a)
        h = rmsnorm(x, p[pre + "post_attention_layernorm.weight"])
        g, u = lin(pre + "mlp.gate_proj.weight", h), lin(pre + "mlp.up_proj.weight", h)
        x = x + lin(pre + "mlp.down_proj.weight", F.silu(g) * u)
    x = rmsnorm(x, p["model.norm.weight"])
    return x @ p["model.embed_tokens.weight"].t().to(x.dtype)


def batches(ids):
    n = ids.numel() - args.ctx - 1
    while True:
        starts = torch.randint(0, n, (args.batch,))
        xb = torch.stack([ids[s: s + args.ctx + 1] for s in starts]).to(dev)
        yield xb[:, :-1], xb[:, 1:]


def seconds_for(minutes, after):
    """The loop's time: minutes, or less so that `after` seconds of work
    still fit before --deadline."""
    b = minutes * 60
    if args.deadline > 0:
        b = min(b, args.deadline - (time.time() - t_start) - after)
    return max(b, 5.0)


def train(params, trainable, ids, budget, lr, lora=None, scale=0.0):
    opt = torch.optim.AdamW(trainable, lr=lr, betas=(0.9, 0.95), weight_decay=0.1 if lora is None else 0.0)
    it, t0, step, losses, est = batches(ids), time.time(), 0, [], None
    while True:
        el = time.time() - t0
        if el >= budget:
            break
        if step == 20:
            est = int(budget / (el / 20))  # total steps the budget allows at this speed
        total = est or 10**9
        warm = 50
        frac = step / warm if step < warm else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
        for g in opt.param_groups:
            g["lr"] = lr * frac
        x, y = next(it)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            logits = forward(params, x, lora, scale)
        loss = F.cross_entropy(logits.float().view(-1, V), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 200 == 0 or step == 1:
            print(f"step {step} loss {sum(losses[-50:]) / len(losses[-50:]):.3f} ({time.time() - t0:.0f}s)", flush=True)
    return step, losses, time.time() - t0


params = init_params()
# leave the adapter's loop and ~40 s of saving after the base's
steps, losses, secs = train(params, list(params.values()), train_ids, seconds_for(args.minutes, args.adapter_minutes * 60 + 40),
                            3e-3 if args.smoke else 1e-3)
base_loss = sum(losses[-100:]) / len(losses[-100:])
print(f"base: {steps} steps in {secs:.0f}s, {steps * args.batch * args.ctx / secs:.0f} tokens/s, final loss {base_loss:.3f}", flush=True)
for v in params.values():
    v.requires_grad_(False)

alpha = 2 * args.rank
scale = alpha / args.rank
lora = {}
for l in range(L):
    for m, (parent, fin, fout) in PROJ.items():
        a = (torch.randn(args.rank, fin) / math.sqrt(fin)).to(dev).requires_grad_()
        b = torch.zeros(fout, args.rank, device=dev).requires_grad_()
        lora[f"model.layers.{l}.{parent}.{m}.weight"] = (a, b)
ad_steps, ad_losses, ad_secs = train(params, [t for ab in lora.values() for t in ab], ad_ids, seconds_for(args.adapter_minutes, 40), 2e-3, lora, scale)
ad_loss = sum(ad_losses[-100:]) / len(ad_losses[-100:])
print(f"adapter: {ad_steps} steps in {ad_secs:.0f}s, final loss {ad_loss:.3f}", flush=True)


# --- save -------------------------------------------------------------------
def save_safetensors(path, tensors):
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().to(torch.bfloat16).contiguous().cpu()
        raw = t.view(torch.int16).numpy().tobytes()
        header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


base_dir, ad_dir, held_dir = (os.path.join(args.out, d) for d in ("base", "adapter", "heldout"))
for d in (base_dir, ad_dir, held_dir):
    os.makedirs(d, exist_ok=True)
cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
       "torch_dtype": "bfloat16", "vocab_size": V, "hidden_size": H, "intermediate_size": I, "num_hidden_layers": L,
       "num_attention_heads": NH, "num_key_value_heads": KVH, "head_dim": HD, "max_position_embeddings": 2048,
       "rms_norm_eps": 1e-5, "rope_theta": THETA, "rope_scaling": None, "tie_word_embeddings": True,
       "bos_token_id": BOS, "eos_token_id": EOS}
json.dump(cfg, open(os.path.join(base_dir, "config.json"), "w"), indent=2)
json.dump({"bos_token_id": BOS, "eos_token_id": EOS}, open(os.path.join(base_dir, "generation_config.json"), "w"))
save_safetensors(os.path.join(base_dir, "model.safetensors"), params)
if not args.smoke:
    for f in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(args.tokenizer, f), "rb") as src, open(os.path.join(base_dir, f), "wb") as dst:
            dst.write(src.read())
mods = list(PROJ)
json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "tiny-llama-trained", "r": args.rank,
           "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": mods, "bias": "none", "fan_in_fan_out": False,
           "use_rslora": False, "use_dora": False, "inference_mode": True},
          open(os.path.join(ad_dir, "adapter_config.json"), "w"), indent=2)
ad_tensors = {}
for name, (a, b) in lora.items():
    stem = "base_model.model." + name[: -len(".weight")]
    ad_tensors[stem + ".lora_A.weight"] = a
    ad_tensors[stem + ".lora_B.weight"] = b
save_safetensors(os.path.join(ad_dir, "adapter_model.safetensors"), ad_tensors)
for name, docs in (("base.txt", base_held), ("adapter.txt", ad_held)):
    with open(os.path.join(held_dir, name), "w") as f:
        f.write("\n\n".join(docs[: args.heldout_docs]) + "\n")
prompts = ["import os", "def __init__(self", "class ", "    def ", "for i in range(", "if __name__ == ", "from ", "# ",
           "    return ", "try:", "with open(", "raise ValueError(", "def _", "self.", "import email", "msg = "]
open(os.path.join(args.out, "prompts.txt"), "w").write("\n".join(prompts) + "\n")
# The check peftd's tests make of a model against transformers, here against
# this file's forward: the logits of a few held-out tokens, for the caller
# to compare with peftd's (reference.json: ids and float32 logits rows).
ids = torch.tensor([[BOS] + encode(base_held[0])[:7]], device=dev)
with torch.no_grad():
    ref = forward({k: v.to(torch.bfloat16).float() for k, v in params.items()}, ids).float()[0]
    ref_ad = forward({k: v.to(torch.bfloat16).float() for k, v in params.items()}, ids,
                     {k: (a.to(torch.bfloat16).float(), b.to(torch.bfloat16).float()) for k, (a, b) in lora.items()}, scale).float()[0]
json.dump({"ids": ids[0].tolist(), "logits": ref.cpu().tolist(), "adapter_logits": ref_ad.cpu().tolist()},
          open(os.path.join(args.out, "reference.json"), "w"))
# train.json last: its presence says the folder is complete (gpu-check skips training then)
info = {"model": cfg, "base": {"files": len(base_train), "tokens": train_ids.numel(), "steps": steps, "seconds": secs, "final_loss": base_loss},
        "adapter": {"package": args.adapter_package, "files": len(ad_train), "tokens": ad_ids.numel(), "rank": args.rank, "steps": ad_steps,
                    "seconds": ad_secs, "final_loss": ad_loss},
        "heldout": {"base_files": min(len(base_held), args.heldout_docs), "adapter_files": min(len(ad_held), args.heldout_docs)},
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__, "total_seconds": time.time() - t_start}
json.dump(info, open(os.path.join(args.out, "train.json"), "w"), indent=2)
print(json.dumps({k: info[k] for k in ("base", "adapter", "heldout")}), flush=True)

