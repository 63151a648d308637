"""Closed-loop load on peftd's invoke endpoint with token-id prompts (for
models without a tokenizer, e.g. tools/make_random_llama.py's checkpoint).
out_tok_s is over the whole run, ramp-up and drain included; steady_tok_s
counts the tokens of requests that ended while every worker was still busy
(after the first quarter of the time until the last request was taken,
until then), so it does not depend on how many requests the run has.
Every fourth request streams (SSE) and gives its time to first token:
ttft_p50_s and ttft_p99_s are over those.
usage: serve_bench.py URL MODELS(comma) REQUESTS CONCURRENCY PROMPT_LEN MAX_TOKENS VOCAB"""
import json, random, sys, threading, time, urllib.request

url, models, n, conc, plen, mt, vocab = sys.argv[1], sys.argv[2].split(","), *map(int, sys.argv[3:8])
rng = random.Random(1)
jobs = [(models[i % len(models)], [rng.randrange(vocab) for _ in range(plen)]) for i in range(n)]
lock, lat, errs, toks, ttft = threading.Lock(), [], [], [0], []
ends, last_taken = [], [0.0]  # (end time, tokens) per request; when the last job was taken
def worker():
    while True:
        with lock:
            if not jobs: return
            k = len(jobs)
            model, ids = jobs.pop()
            if not jobs: last_taken[0] = time.time()
        stream = k % 4 == 0
        body = json.dumps({"prompt_ids": ids, "max_tokens": mt, "ignore_eos": True, "stream": stream}).encode()
        req = urllib.request.Request(f"{url}/v1/adapters/{model}/invoke", body, {"Content-Type": "application/json"})
        t0 = time.time()
        try:
            resp = urllib.request.urlopen(req, timeout=300)
            first = None
            if stream:
                u = 0
                for line in resp:
                    if not line.startswith(b"data: {"):
                        continue
                    ev = json.loads(line[6:])
                    if "error" in ev:
                        raise RuntimeError(ev["error"])
                    if ev.get("token_ids") and first is None:
                        first = time.time() - t0
                    if "usage" in ev:
                        u = ev["usage"]["completion_tokens"]
            else:
                u = json.load(resp).get("usage", {}).get("completion_tokens", mt)
            with lock:
                lat.append(time.time() - t0); toks[0] += u; ends.append((time.time(), u))
                if first is not None: ttft.append(first)
        except Exception as e:
            with lock: errs.append(str(e)[:200])
t0 = time.time()
ts = [threading.Thread(target=worker) for _ in range(conc)]
[t.start() for t in ts]; [t.join() for t in ts]
el = time.time() - t0
lat.sort()
ttft.sort()
def pct(v, q):  # nearest rank
    return v[min(len(v) - 1, max(0, int(round(q * len(v) + 0.5)) - 1))] if v else 0.0
w0 = t0 + (last_taken[0] - t0) / 4
steady = sum(u for t, u in ends if w0 <= t <= last_taken[0]) / max(last_taken[0] - w0, 1e-9)
print(f"SERVEBENCH models={','.join(models)} requests={n} ok={len(lat)} errors={len(errs)} conc={conc} prompt={plen} max_tokens={mt} "
      f"elapsed_s={el:.1f} out_tok_s={toks[0]/el:.0f} steady_tok_s={steady:.0f} p50_s={lat[len(lat)//2] if lat else 0:.2f} p99_s={lat[int(len(lat)*0.99)-1] if lat else 0:.2f} "
      f"ttft_p50_s={pct(ttft, .5):.3f} ttft_p99_s={pct(ttft, .99):.3f} ttft_n={len(ttft)}")
if errs: print("first error:", errs[0])
