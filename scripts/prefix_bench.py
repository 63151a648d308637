"""Shared-prefix chat-like load on peftd (token-id prompts, for models
without a tokenizer): every request is one shared system prefix of PREFIX
tokens plus UNIQUE tokens of its own, streamed from /v1/completions so the
time to the first token is measured; closed loop at CONCURRENCY.
usage: prefix_bench.py URL MODELS(comma) REQUESTS CONCURRENCY PREFIX UNIQUE MAX_TOKENS VOCAB TAG
prints one line: PREFIXBENCH tag=... ttft_p50_ms ttft_p99_ms out_tok_s ..."""
import json, random, sys, threading, time, urllib.request

url, models = sys.argv[1], sys.argv[2].split(",")
n, conc, plen, ulen, mt, vocab = map(int, sys.argv[3:9])
tag = sys.argv[9]
rng = random.Random(7)
system = [rng.randrange(3, vocab) for _ in range(plen)]
jobs = [(models[i % len(models)], system + [rng.randrange(3, vocab) for _ in range(ulen)]) for i in range(n)]
lock, ttft, lat, errs, toks = threading.Lock(), [], [], [], [0]

def worker():
    while True:
        with lock:
            if not jobs:
                return
            model, ids = jobs.pop()
        body = json.dumps({"model": model, "prompt": ids, "max_tokens": mt, "ignore_eos": True,
                           "temperature": 0, "stream": True}).encode()
        req = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
        t0 = time.time()
        first, n_tok = None, 0
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                for line in r:
                    line = line.strip()
                    if not line.startswith(b"data: ") or line == b"data: [DONE]":
                        continue
                    ev = json.loads(line[6:])
                    if "error" in ev:
                        raise RuntimeError(str(ev["error"])[:200])
                    ch = ev.get("choices") or []
                    if ch and ch[0].get("text") is not None and first is None:
                        first = time.time() - t0
                    n_tok += 1
            with lock:
                ttft.append(first if first is not None else time.time() - t0)
                lat.append(time.time() - t0)
                toks[0] += mt
        except Exception as e:
            with lock:
                errs.append(str(e)[:200])

t0 = time.time()
ts = [threading.Thread(target=worker) for _ in range(conc)]
[t.start() for t in ts]
[t.join() for t in ts]
el = time.time() - t0
ttft.sort(); lat.sort()
q = lambda v, p: v[min(len(v) - 1, int(len(v) * p))] * 1000 if v else 0
print(f"PREFIXBENCH tag={tag} models={','.join(models)} requests={n} ok={len(lat)} errors={len(errs)} conc={conc} "
      f"prefix={plen} unique={ulen} max_tokens={mt} elapsed_s={el:.1f} out_tok_s={toks[0]/el:.0f} "
      f"ttft_p50_ms={q(ttft, .5):.0f} ttft_p99_ms={q(ttft, .99):.0f} e2e_p50_ms={q(lat, .5):.0f}")
if errs:
    print("first error:", errs[0])
