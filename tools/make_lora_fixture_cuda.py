"""GPU path of make_lora_fixture.py for large shapes (spec "device": "cuda").

Same outputs and reference rules as the CPU path: bf16 base checkpoint, PEFT
adapters in their own dtype, float32 reference logits (prefill of every
prompt row, then greedy decode with a full recompute per step) computed on the
stored values. TF32 is off, so GPU float32 products are true float32.
"""
import json, os, time
import torch
from safetensors.torch import save_file
from transformers import LlamaForCausalLM
from peft import LoraConfig, PeftModel

MODS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
        "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def dims(cfg, m):
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}[m]


def run(spec, cfg, config, out):
    t0 = time.time()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(spec["seed"])
    dtype = getattr(torch, spec["base_dtype"])
    with dev:
        model = LlamaForCausalLM(config)
    sd = {}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                v = 1.0 + 0.1 * torch.randn(p.shape, generator=g, device=dev)
            else:
                v = torch.randn(p.shape, generator=g, device=dev) * spec["init_std"]
            sd[n] = v.to(dtype).cpu().contiguous()
    del model
    torch.cuda.empty_cache()
    if cfg.get("tie_word_embeddings"):
        sd.pop("lm_head.weight", None)
    save_file(sd, out + "/base/model.safetensors", metadata={"format": "pt"})
    del sd
    print(f"base written ({time.time() - t0:.1f}s)", flush=True)
    model = LlamaForCausalLM.from_pretrained(out + "/base", torch_dtype=torch.float32, attn_implementation="eager").to(dev).eval()

    L = cfg["num_hidden_layers"]
    adapters, saved = {}, {}
    for a in spec["adapters"]:
        lc = LoraConfig(r=a["r"], lora_alpha=a["alpha"], target_modules=a["targets"], lora_dropout=0.0,
                        bias="none", task_type="CAUSAL_LM", use_rslora=a.get("rslora", False),
                        layers_to_transform=a.get("layers"))
        d = out + "/adapters/" + a["name"]
        os.makedirs(d, exist_ok=True)
        lc.save_pretrained(d)
        ac = json.load(open(d + "/adapter_config.json"))
        ac["base_model_name_or_path"] = spec.get("base_name", "base")
        json.dump(ac, open(d + "/adapter_config.json", "w"), indent=2)
        adt = getattr(torch, a["dtype"])
        t = {}
        for l in range(L):
            if a.get("layers") is not None and l not in a["layers"]:
                continue
            for m in a["targets"]:
                fin, fout = dims(cfg, m)
                pre = f"base_model.model.model.layers.{l}.{MODS[m]}.{m}"
                t[pre + ".lora_A.weight"] = (torch.randn(a["r"], fin, generator=g, device=dev) * a["std_a"]).to(adt).cpu().contiguous()
                t[pre + ".lora_B.weight"] = (torch.randn(fout, a["r"], generator=g, device=dev) * a["std_b"]).to(adt).cpu().contiguous()
        save_file(t, d + "/adapter_model.safetensors", metadata={"format": "pt"})
        adapters[a["name"]], saved[a["name"]] = d, t

    names = list(adapters)
    pm = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0], torch_dtype=torch.float32)
    for n in names[1:]:
        pm.load_adapter(adapters[n], adapter_name=n)
    pm = pm.to(dev).eval()
    # every saved LoRA tensor must have landed in the model (a wrong key would be skipped silently)
    params = dict(pm.named_parameters())
    for n, t in saved.items():
        for k, v in t.items():
            pk = k.replace(".lora_A.weight", f".lora_A.{n}.weight").replace(".lora_B.weight", f".lora_B.{n}.weight")
            if pk not in params or not torch.equal(params[pk].detach().float().cpu(), v.float()):
                raise SystemExit(f"adapter {n}: {k} did not load as {pk}")
    print(f"adapters written and loaded ({time.time() - t0:.1f}s)", flush=True)

    def forward(adapter, ids):
        x = torch.tensor([ids], device=dev)
        if adapter is None:
            with pm.disable_adapter():
                return pm(input_ids=x).logits[0].float()
        pm.set_adapter(adapter)
        return pm(input_ids=x).logits[0].float()

    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    V = cfg["vocab_size"]
    cases, expected = [], {}
    with torch.no_grad():
        for i, c in enumerate(spec["cases"]):
            ids = torch.randint(3, V, (c["len"],), generator=gen).tolist()
            pre = forward(c["adapter"], ids)
            seq, dec, greedy = list(ids), [], []
            nxt = int(pre[-1].argmax())
            for _ in range(c["decode"]):
                greedy.append(nxt)
                seq.append(nxt)
                lg = forward(c["adapter"], seq)[-1]
                dec.append(lg)
                nxt = int(lg.argmax())
            top2 = torch.topk(torch.cat([pre[-1:], torch.stack(dec)]), 2, dim=-1).values
            print(f"case {i} ({c['adapter']}): smallest top-2 logit gap {float((top2[:, 0] - top2[:, 1]).min()):.4f}", flush=True)
            expected[f"case{i}.prefill_logits"] = pre.cpu().contiguous()
            expected[f"case{i}.decode_logits"] = torch.stack(dec).cpu().contiguous()
            expected[f"case{i}.greedy"] = torch.tensor(greedy, dtype=torch.int64)
            cases.append({"id": i, "adapter": c["adapter"], "prompt": ids, "decode": c["decode"]})
        save_file(expected, out + "/expected.safetensors")
        json.dump({"cases": cases, "note": spec.get("note", "")}, open(out + "/cases.json", "w"), indent=1)
        x = cases[0]["prompt"]
        base = forward(None, x)
        for n in names:
            dlt = (forward(n, x) - base).abs().max().item()
            print("adapter", n, "max |logit delta| vs base", round(dlt, 4))
            if not dlt > 1e-3:
                raise SystemExit(f"adapter {n} does not change the logits")
    print("wrote", out, "cases", len(cases), f"({time.time() - t0:.1f}s)")
