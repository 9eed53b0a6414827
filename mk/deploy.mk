# Shipping edge-model-loader as an Azure IoT Edge module (docs/deployment.md). Included by the
# Makefile, which defines VENV and the $(STAMP) setup target; the default below lets this file work
# on its own too.
#
#   make image [PLATFORMS=linux/amd64] [BASE_IMAGE=...]   build the image (docker buildx, else podman, else buildah)
#   make push                            build and push <repo>:<version>-amd64, -arm64v8 and <repo>:<version>
#   make deployment                      config/deployment.amd64.json and .arm64v8.json from the template
#   make lint-docker                     hadolint docker/Dockerfile
#   make image-test                      build the amd64 image from a local Debian base and run it (podman)
#   make image-test-arm64                the same for linux/arm64 under QEMU user emulation (~10 minutes)

VENV ?= .venv
DOCKER ?= docker
PLATFORMS ?= linux/amd64,linux/arm64
# iotedgedev platform names, one deployment manifest each.
EDGE_PLATFORMS ?= amd64 arm64v8
# A docker-container buildx builder: the default "docker" driver cannot build several platforms at once.
# It uses the host network so that a registry at localhost:5000 is the host's, not the builder container's.
BUILDER ?= edge-model-loader

# The registry: the environment, else .env (the file iotedgedev reads too), else a local registry.
CONTAINER_REGISTRY_SERVER ?= $(or $(shell sed -n 's/^CONTAINER_REGISTRY_SERVER=//p' .env 2>/dev/null | tr -d '"'"'"),localhost:5000)

# Image name and version come from docker/module.json, as iotedgedev reads them, so the tags pushed
# here are the ones the generated manifests name.
_module_json = python3 -c 'import json, os, sys; m = json.load(open("docker/module.json"))["image"]; print(os.path.expandvars(m["repository"] if sys.argv[1] == "repo" else m["tag"]["version"]))'
IMAGE = $(shell CONTAINER_REGISTRY_SERVER='$(CONTAINER_REGISTRY_SERVER)' $(_module_json) repo)
IMAGE_VERSION = $(shell $(_module_json) version)

# Both stages of docker/Dockerfile start from it: the official slim Python image, or any Debian bookworm
# image with Python 3.11 (scripts/bookworm-base.sh makes one from Debian's packages).
BASE_IMAGE ?= python:3.11-slim-bookworm

# What builds: docker buildx where it answers, else podman, else buildah (podman and buildah take the
# same flags). IMAGE_TOOL=podman forces one.
ifndef IMAGE_TOOL
IMAGE_TOOL := $(shell if $(DOCKER) buildx version >/dev/null 2>&1; then echo buildx; \
	elif command -v podman >/dev/null 2>&1; then echo podman; \
	elif command -v buildah >/dev/null 2>&1; then echo buildah; else echo none; fi)
endif
# More flags for podman/buildah build, e.g. `--isolation chroot --network host` inside a container or a
# sandbox without cgroups (the tests use these).
BUILD_FLAGS ?=

_comma := ,
_platform_list = $(subst $(_comma), ,$(PLATFORMS))
# linux/amd64 -> amd64, linux/arm64 -> arm64v8 (the iotedgedev / IoT Edge tag suffixes)
_edge_arch = $(patsubst arm64,arm64v8,$(patsubst arm/v7,arm32v7,$(patsubst linux/%,%,$(1))))
_buildx = $(DOCKER) buildx build --builder $(BUILDER) -f docker/Dockerfile --build-arg BASE_IMAGE=$(BASE_IMAGE)
# --format docker: the OCI format has no HEALTHCHECK, and podman would drop it.
_oci_build = $(IMAGE_TOOL) build --format docker -f docker/Dockerfile --build-arg BASE_IMAGE=$(BASE_IMAGE) $(BUILD_FLAGS)

# Writes the iotedgedev settings (no telemetry, no first-run banner) into a private HOME, so
# `make deployment` never turns on telemetry in the user's own ~/.iotedgedev.
IOTEDGEDEV_HOME = $(CURDIR)/.tools/iotedgedev-home

.PHONY: image push deployment lint-docker buildx-builder image-tool image-test image-test-arm64

image-tool:
	@case "$(IMAGE_TOOL)" in buildx|podman|buildah) ;; \
	*) echo "error: no image builder: install docker with buildx, podman or buildah (IMAGE_TOOL=$(IMAGE_TOOL))"; exit 1;; esac

buildx-builder:
	@$(DOCKER) buildx inspect $(BUILDER) >/dev/null 2>&1 \
		|| $(DOCKER) buildx create --name $(BUILDER) --driver docker-container --driver-opt network=host >/dev/null

ifeq ($(IMAGE_TOOL),buildx)
# Several platforms: the result stays in the builder's cache (docker cannot load a multi-platform
# image); `make push` reuses it. One platform: loaded into docker as <repo>:<version>-<arch> too.
image: image-tool buildx-builder
	$(_buildx) --platform $(PLATFORMS) -t $(IMAGE):$(IMAGE_VERSION) \
		$(if $(findstring $(_comma),$(PLATFORMS)),,--load -t $(IMAGE):$(IMAGE_VERSION)-$(call _edge_arch,$(PLATFORMS))) .

# One tag per architecture (what the generated manifests reference) plus a multi-platform tag.
push: image-tool buildx-builder
	$(foreach p,$(_platform_list),$(_buildx) --platform $(p) -t $(IMAGE):$(IMAGE_VERSION)-$(call _edge_arch,$(p)) --push . &&) \
		$(_buildx) --platform $(PLATFORMS) -t $(IMAGE):$(IMAGE_VERSION) --push .
else
# podman or buildah: each platform is built into the local store as <repo>:<version>-<arch>; with one
# platform it is <repo>:<version> too.
image: image-tool
	$(foreach p,$(_platform_list),$(_oci_build) --platform $(p) -t $(IMAGE):$(IMAGE_VERSION)-$(call _edge_arch,$(p)) \
		$(if $(findstring $(_comma),$(PLATFORMS)),,-t $(IMAGE):$(IMAGE_VERSION)) . &&) true

# The per-architecture tags, then a manifest list <repo>:<version> over them.
push: image
	$(foreach p,$(_platform_list),$(IMAGE_TOOL) push $(IMAGE):$(IMAGE_VERSION)-$(call _edge_arch,$(p)) &&) true
	-$(IMAGE_TOOL) manifest rm $(IMAGE):$(IMAGE_VERSION) >/dev/null 2>&1
	$(IMAGE_TOOL) manifest create $(IMAGE):$(IMAGE_VERSION)
	$(foreach p,$(_platform_list),$(IMAGE_TOOL) manifest add $(IMAGE):$(IMAGE_VERSION) \
		containers-storage:$(IMAGE):$(IMAGE_VERSION)-$(call _edge_arch,$(p)) &&) true
	$(IMAGE_TOOL) manifest push --all $(IMAGE):$(IMAGE_VERSION) docker://$(IMAGE):$(IMAGE_VERSION)
endif

# The image built from a Debian bookworm base made here with debootstrap (Docker Hub not needed) and its
# entrypoint run as uid 10001: health, a detection, a dropped model, a clean stop
# (tests/test_container_image.py; `make test` runs the amd64 one).
image-test: $(STAMP) services
	$(VENV)/bin/pytest -q -p no:cacheprovider tests/test_container_image.py

# The same for linux/arm64 through QEMU user emulation: about 10 minutes, so not part of `make test`.
image-test-arm64: $(STAMP)
	bash scripts/install-test-services.sh --qemu
	EDGELOADER_IMAGE_PLATFORM=linux/arm64 $(VENV)/bin/pytest -q -p no:cacheprovider -o timeout=3600 \
		tests/test_container_image.py

deployment: $(STAMP)
	@mkdir -p $(IOTEDGEDEV_HOME)/.iotedgedev
	@printf '[DEFAULT]\nfirsttime = no\ncollect_telemetry = no\n' > $(IOTEDGEDEV_HOME)/.iotedgedev/setting.ini
	$(foreach p,$(EDGE_PLATFORMS),HOME=$(IOTEDGEDEV_HOME) CONTAINER_REGISTRY_SERVER='$(CONTAINER_REGISTRY_SERVER)' \
		$(VENV)/bin/iotedgedev solution genconfig \
		-f deployment.template.json -P $(p) --fail-on-validation-error &&) true
	@# iotedgedev leaves a variable it does not know as it is (e.g. no CONTAINER_REGISTRY_USERNAME in .env).
	@if grep -n '\$${' $(foreach p,$(EDGE_PLATFORMS),config/deployment.$(p).json); then \
		echo "error: unexpanded variables above: define them in .env (see .env.example; empty is fine)"; exit 1; fi
	@echo "wrote $(foreach p,$(EDGE_PLATFORMS),config/deployment.$(p).json) (images $(IMAGE):$(IMAGE_VERSION)-<arch>)"

lint-docker: $(STAMP)
	$(VENV)/bin/hadolint docker/Dockerfile
