"""Closed-loop load on peftd's invoke endpoint with token-id prompts (for
models without a tokenizer, e.g. tools/make_random_llama.py's checkpoint).
out_tok_s is over the whole run, ramp-up and drain included; steady_tok_s
counts the tokens of requests that ended while every worker was still busy
(after the first quarter of the time until the last request was taken,
until then), so it does not depend on how many requests the run has.
usage: serve_bench.py URL MODELS(comma) REQUESTS CONCURRENCY PROMPT_LEN MAX_TOKENS VOCAB"""
import json, random, sys, threading, time, urllib.request

url, models, n, conc, plen, mt, vocab = sys.argv[1], sys.argv[2].split(","), *map(int, sys.argv[3:8])
rng = random.Random(1)
jobs = [(models[i % len(models)], [rng.randrange(vocab) for _ in range(plen)]) for i in range(n)]
lock, lat, errs, toks = threading.Lock(), [], [], [0]
ends, last_taken = [], [0.0]  # (end time, tokens) per request; when the last job was taken
def worker():
    while True:
        with lock:
            if not jobs: return
            model, ids = jobs.pop()
            if not jobs: last_taken[0] = time.time()
        body = json.dumps({"prompt_ids": ids, "max_tokens": mt, "ignore_eos": True}).encode()
        req = urllib.request.Request(f"{url}/v1/adapters/{model}/invoke", body, {"Content-Type": "application/json"})
        t0 = time.time()
        try:
            r = json.load(urllib.request.urlopen(req, timeout=300))
            u = r.get("usage", {}).get("completion_tokens", mt)
            with lock: lat.append(time.time() - t0); toks[0] += u; ends.append((time.time(), u))
        except Exception as e:
            with lock: errs.append(str(e)[:200])
t0 = time.time()
ts = [threading.Thread(target=worker) for _ in range(conc)]
[t.start() for t in ts]; [t.join() for t in ts]
el = time.time() - t0
lat.sort()
w0 = t0 + (last_taken[0] - t0) / 4
steady = sum(u for t, u in ends if w0 <= t <= last_taken[0]) / max(last_taken[0] - w0, 1e-9)
print(f"SERVEBENCH models={','.join(models)} requests={n} ok={len(lat)} errors={len(errs)} conc={conc} prompt={plen} max_tokens={mt} "
      f"elapsed_s={el:.1f} out_tok_s={toks[0]/el:.0f} steady_tok_s={steady:.0f} p50_s={lat[len(lat)//2] if lat else 0:.2f} p99_s={lat[int(len(lat)*0.99)-1] if lat else 0:.2f}")
if errs: print("first error:", errs[0])
