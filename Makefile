# mindstream: the two commands are `make demo` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: setup build demo test lint unit model bench soak fuzz clean

setup:
	scripts/setup.sh
	scripts/sample-data.sh >/dev/null

build: setup
	$(CARGO) build --release --bins

demo: build
	scripts/demo.sh

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

# The fuzz targets run 60 s each (fuzz/README.md) before the tests, whose summary stays last.
test: setup lint
	FUZZ_BUILD=quick scripts/fuzz.sh 60
	$(CARGO) test --all-targets

# Longer fuzzing: every target FUZZ_SECONDS each, building on the corpus of earlier runs.
FUZZ_SECONDS ?= 600
fuzz: setup
	scripts/fuzz.sh $(FUZZ_SECONDS)

# Benchmarks; their results and commands are written up in docs/PERFORMANCE.md.
bench: setup
	$(CARGO) bench --bench state -- 1000000 taobao
	$(CARGO) bench --bench state -- 1000000 8
	$(CARGO) bench --bench state -- 1000000 32
	$(CARGO) bench --bench inference
	$(CARGO) bench --bench ingest
	$(CARGO) bench --bench e2e -- 1
	$(CARGO) bench --bench e2e -- 2

# Ten minutes at a steady rate with the processor's resident memory sampled (docs/PERFORMANCE.md).
soak: setup
	$(CARGO) bench --bench soak -- 10 100 500

# Rebuilds the shipped default model and its report in docs/evaluation from the public data
# sets (about 15 minutes on 2 cores).
model:
	$(CARGO) build --release --bin mindstream-train
	target/release/mindstream-train build --data ../shared/data --out models

clean:
	rm -rf run target
