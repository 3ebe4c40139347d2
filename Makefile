# The two commands a newcomer needs. Both do all the set-up first (scripts/setup.sh is
# idempotent and quiet when there is nothing to do).
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: demo test setup build build-release stack stack-down

## demo: set up, build, and run the main job end to end on the built-in default data (ml-100k).
demo: setup
	$(CARGO) build --release -p cli
	scripts/demo.sh

## test: set up, then run the whole test suite (unit, smoke, integration, end-to-end).
test: setup
	$(CARGO) test --workspace --all-targets
	$(CARGO) test --workspace --doc

setup:
	scripts/setup.sh

build: setup
	$(CARGO) build --workspace --all-targets

build-release: setup
	$(CARGO) build --release -p cli

## stack: the local compose stack (NATS, pipeline, two replicas, balancer, Prometheus), serving on :50051.
stack:
	scripts/stack.sh up

stack-down:
	scripts/stack.sh down
