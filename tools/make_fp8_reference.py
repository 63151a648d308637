"""A torch reference of exactly peftd's --weights fp8 scheme, for a fixture made by
make_lora_fixture.py (issue 14's "scheme fidelity"; runtime/gpu TestFP8SchemeFidelity).

The fixture's model and adapters run in float32 (transformers + PEFT, TF32 off) with
every decoder-layer projection (q, k, v, o, gate, up, down) computed as peftd does:
  W  per output row: amax = max |w| over the stored weights, inv = 448 / amax (float32),
     q = e4m3(w * inv) rounded to nearest even and saturated at 448, scale = amax / 448
     (a zero row: scale 1 and zeros), quantized once
  x  the projection's input rounded to bf16 (peftd's activations are bf16), then
     quantized per token (row) the same way
  y  = (q_x . q_w) * scale_x * scale_w in float32 (e4m3 products are exact), rounded
     to bf16 (peftd's projection output)
LoRA runs on the unquantized input, as peftd's does. Everything else is the fixture's
float32 reference math (peftd keeps it in bf16: that difference is the bf16 path's).
Each case runs teacher-forced on its prompt + the fixture's greedy tokens, so the rows
are the fixture's: prefill rows, then decode rows.

With --kv fp8 the keys are what peftd's --kv-cache fp8 attends over: each rotated key,
rounded to bf16, quantized per token and KV head the same way (amax over head_dim)
and dequantized; values stay as they are. --weights bf16 leaves the projections
exact (a reference of the FP8 keys alone).

Writes OUTDIR/expected.safetensors and OUTDIR/cases.json in the fixture's format and
links OUTDIR/base and OUTDIR/adapters to the fixture's. One base model holds every
adapter (PeftModel.load_adapter), so an 8B-shape fixture fits on one GPU.
usage: python3 make_fp8_reference.py [--weights fp8|bf16] [--kv bf16|fp8] FIXTUREDIR OUTDIR
"""
import argparse, json, os, sys, time
import torch
from safetensors.torch import save_file, load_file
from transformers import AutoModelForCausalLM
from peft import PeftModel

ap = argparse.ArgumentParser()
ap.add_argument("--weights", choices=["fp8", "bf16"], default="fp8")
ap.add_argument("--kv", choices=["bf16", "fp8"], default="bf16")
ap.add_argument("fixture")
ap.add_argument("out")
args = ap.parse_args()
fx, out = args.fixture, args.out
t0 = time.time()
os.makedirs(out, exist_ok=True)
for d in ("base", "adapters"):
    link = os.path.join(out, d)
    if not os.path.lexists(link):
        os.symlink(os.path.abspath(os.path.join(fx, d)), link)
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
E4M3_MAX = 448.0
PROJ = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def quant_rows(x):
    """per-row e4m3 quantization of float32 x [..., K]: (q as float32, scale [..., 1])"""
    amax = x.abs().amax(dim=-1, keepdim=True)
    zero = amax == 0
    safe = torch.where(zero, torch.ones_like(amax), amax)
    inv = torch.where(zero, torch.zeros_like(amax), torch.full_like(amax, E4M3_MAX) / safe)
    q = (x * inv).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    scale = torch.where(zero, torch.ones_like(amax), safe / E4M3_MAX)
    return q, scale


class FP8Linear(torch.nn.Module):
    """a projection computed as peftd's FP8 path computes it"""

    def __init__(self, lin):
        super().__init__()
        self.weight, self.bias = lin.weight, lin.bias  # kept: PEFT may look at them
        self.in_features, self.out_features = lin.in_features, lin.out_features
        with torch.no_grad():
            self.qw, self.sw = quant_rows(lin.weight.detach().float())

    def forward(self, x):
        shape = x.shape
        xb = x.reshape(-1, shape[-1]).to(torch.bfloat16).float()
        qx, sx = quant_rows(xb)
        y = (qx.float() @ self.qw.float().t()) * sx * self.sw.t()
        y = y.to(torch.bfloat16).float()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.reshape(*shape[:-1], self.out_features)


ROTARY_CALLS = [0]  # calls of the patched apply_rotary_pos_emb: 0 means the patch missed


def fp8_keys():
    """make every Llama attention attend over e4m3 keys, quantized per (token, KV head)
    after RoPE from their bf16 rounding, as peftd's FP8 key cache holds them"""
    import transformers.models.llama.modeling_llama as ml
    orig = ml.apply_rotary_pos_emb

    def rotary(q, k, *a, **kw):
        ROTARY_CALLS[0] += 1
        q2, k2 = orig(q, k, *a, **kw)
        kb = k2.to(torch.bfloat16).float()  # [batch, kv heads, seq, head_dim]
        qk, sk = quant_rows(kb)
        return q2, (qk.float() * sk).to(k2.dtype)

    ml.apply_rotary_pos_emb = rotary


def patch(model):
    n = 0
    for name, mod in list(model.named_modules()):
        for child, sub in list(mod.named_children()):
            own = name.split(".")[-1] if name else ""
            if isinstance(sub, torch.nn.Linear) and (child in PROJ or (child == "base_layer" and own in PROJ)):
                setattr(mod, child, FP8Linear(sub))
                n += 1
    return n


cases = json.load(open(os.path.join(fx, "cases.json")))
exp = load_file(os.path.join(fx, "expected.safetensors"))
names = sorted({c["adapter"] for c in cases["cases"] if c["adapter"] is not None})
base = AutoModelForCausalLM.from_pretrained(os.path.join(fx, "base"), torch_dtype=torch.float32).to(dev).eval()
model = base
if names:
    model = PeftModel.from_pretrained(base, os.path.join(fx, "adapters", names[0]), adapter_name=names[0], torch_dtype=torch.float32)
    for a in names[1:]:
        model.load_adapter(os.path.join(fx, "adapters", a), adapter_name=a)
    model = model.to(dev).eval()
if args.weights == "fp8":
    print("fp8 projections:", patch(model), f"({time.time() - t0:.1f}s)", flush=True)
if args.kv == "fp8":
    fp8_keys()
    print("fp8 keys after RoPE", flush=True)

out_t = {}
with torch.no_grad():
    for i, c in enumerate(cases["cases"]):
        greedy = exp[f"case{i}.greedy"].tolist()
        ids = torch.tensor([list(c["prompt"]) + greedy], device=dev)
        L, N = len(c["prompt"]), c["decode"]
        if c["adapter"] is None:
            if names:
                with model.disable_adapter():
                    lg = model(input_ids=ids).logits[0].float().cpu()
            else:
                lg = model(input_ids=ids).logits[0].float().cpu()
        else:
            model.set_adapter(c["adapter"])
            lg = model(input_ids=ids).logits[0].float().cpu()
        out_t[f"case{i}.prefill_logits"] = lg[:L].contiguous()
        out_t[f"case{i}.decode_logits"] = lg[L:L + N].contiguous()
        out_t[f"case{i}.greedy"] = exp[f"case{i}.greedy"]
        ex = torch.cat([exp[f"case{i}.prefill_logits"], exp[f"case{i}.decode_logits"]])
        rel = ((lg[:L + N] - ex).norm() / ex.norm()).item()
        print(f"case {i} ({c['adapter']}): scheme vs exact relative {rel:.4f}", flush=True)
if args.kv == "fp8" and ROTARY_CALLS[0] == 0:
    # this transformers calls RoPE some other way: the keys were not quantized
    sys.exit("--kv fp8: apply_rotary_pos_emb was never called through the patch: the reference would have bf16 keys")
save_file(out_t, os.path.join(out, "expected.safetensors"))
json.dump(cases, open(os.path.join(out, "cases.json"), "w"), indent=1)
print("wrote", out, f"({time.time() - t0:.1f}s)")
